"""A convolutional variational autoencoder: it learns to rebuild good images through a small
latent code, and anomalies are what it cannot rebuild.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014; the weight beta on the KL term
after Higgins et al., "beta-VAE", ICLR 2017; the optional feature-space reconstruction term after
Hou et al., "Deep Feature Consistent Variational Autoencoder", WACV 2017.

    images [0, 1] -> DCGAN encoder -> mean, log variance [B, latent_dim]
    training: z = mean + sigma * noise -> DCGAN decoder -> reconstruction [0, 1]
        loss = pixel error (mean over pixels)
             + feature_weight * (1 - cosine) between frozen-encoder taps of image and reconstruction
             + beta * KL(q(z|x) || N(0, I)) / (values per image)
    inference: z = mean (no sampling)
    anomaly map = per-pixel reconstruction error (mean over colour channels), smoothed
    image score = mean of the top 1 % of the map, as for Dinomaly
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DCGANDecoder, DCGANEncoder, SmoothUpsample, top_fraction_mean
from .losses import kl_to_standard_normal, tap_cosine_distance

# maps are smoothed with sigma 4 on 256-px maps, as Dinomaly's; sigma is scaled with the map size.
REFERENCE_MAP_SIZE = 256
# log variances are clamped to this range: exp() of an untrained encoder's output must stay finite
LOG_VAR_RANGE = (-30.0, 20.0)


class VAE(nn.Module):
    """DCGAN encoder -> Gaussian latent -> DCGAN decoder, trained on good images only.

    input_size: side of the square input; a power of two (every stage halves it down to 4x4).
    latent_dim: size of the latent code z.
    width, max_width: channels of the first convolution stage, doubling per stage up to max_width.
    beta: weight of the KL term. It is divided by the number of values per image (3 S^2), as the
        pixel error is a mean, so beta = 1 is the usual VAE bound (squared error summed over pixels).
    pixel_loss: "mse" or "l1"; the anomaly map uses the same error.
    encoder: a frozen pre-trained encoder (conf/model/encoder) for the feature-space term, or None.
    feature_weight: weight of that term; > 0 exactly when an encoder is given.
    map_sigma: Gaussian smoothing of the anomaly map at 256 px; scaled with the input size.
    score_top_fraction: the image score is the mean of this top fraction of map pixels.
    """

    def __init__(
        self,
        input_size: int = 256,
        latent_dim: int = 128,
        width: int = 32,
        max_width: int = 256,
        beta: float = 1.0,
        pixel_loss: Literal["mse", "l1"] = "mse",
        encoder: nn.Module | None = None,
        feature_weight: float = 0.0,
        map_sigma: float = 4.0,
        score_top_fraction: float = 0.01,
    ):
        super().__init__()
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
        if beta < 0 or feature_weight < 0:
            raise ValueError(f"beta and feature_weight must be >= 0, got {beta} and {feature_weight}")
        if encoder is None and feature_weight > 0:
            raise ValueError("feature_weight > 0 needs a frozen encoder: add model/encoder=efficientnet_lite0")
        if encoder is not None and feature_weight == 0:
            raise ValueError("an encoder is set but feature_weight is 0: set model.feature_weight > 0, "
                             "or leave out the model/encoder override")
        if encoder is not None and encoder.input_size != input_size:
            raise ValueError(f"the encoder's input_size {encoder.input_size} differs from the VAE's {input_size}")
        self.input_size = input_size
        self.latent_dim = latent_dim
        self.beta = beta
        self.pixel_loss = pixel_loss
        self.feature_weight = feature_weight
        self.score_top_fraction = score_top_fraction
        self.to_latent = DCGANEncoder(input_size, 3, 2 * latent_dim, width, max_width)  # mean, log variance
        self.to_image = DCGANDecoder(input_size, latent_dim, 3, width, max_width)
        self.encoder = encoder
        self.blur = SmoothUpsample(input_size, input_size, sigma=map_sigma * input_size / REFERENCE_MAP_SIZE)
        # the networks see [-1, 1] (tanh output); kept as buffers so the checkpoint meta can report them
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    def train(self, mode: bool = True) -> "VAE":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: its batch norm / dropout never train
        return self

    # --- stages -------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> (mean, log variance), each [B, latent_dim]."""
        mean, log_var = self.to_latent((images - self.mean) / self.std).chunk(2, dim=1)
        return mean, log_var.clamp(*LOG_VAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] -> reconstructions [B, 3, S, S] in [0, 1]."""
        return self.to_image(z) * self.std + self.mean

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images -> (reconstruction from the mean code, mean, log variance); no sampling."""
        mean, log_var = self.encode(images)
        return self.decode(mean), mean, log_var

    def pixel_error(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] twice -> [B, 1, S, S] squared or absolute error, averaged over channels."""
        difference = images - reconstruction
        error = difference.square() if self.pixel_loss == "mse" else difference.abs()
        return error.mean(dim=1, keepdim=True)

    def anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """-> [B, 1, S, S] smoothed reconstruction error at the input resolution."""
        return self.blur(self.pixel_error(images, reconstruction))

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> [B] image scores: the mean of the top fraction of pixels."""
        return top_fraction_mean(anomaly_map, self.score_top_fraction)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (anomaly maps [B, 1, S, S], scores [B])."""
        reconstruction, _, _ = self(images)
        maps = self.anomaly_map(images, reconstruction)
        return maps, self.score(maps)

    # --- training -------------------------------------------------------------

    def losses(self, images: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
               log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of the training loss, each a scalar; "loss" is their weighted sum."""
        B, C, H, W = images.shape
        pixel = self.pixel_error(images, reconstruction).mean()
        kl = kl_to_standard_normal(mean, log_var) / (C * H * W)
        loss = pixel + self.beta * kl
        terms = {"pixel": pixel, "kl": kl}
        if self.encoder is not None:
            with torch.no_grad():
                target = self.encoder(images)
            terms["features"] = tap_cosine_distance(target, self.encoder(reconstruction),
                                                    self.encoder.num_prefix_tokens)
            loss = loss + self.feature_weight * terms["features"]
        return {"loss": loss, **terms}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """What each optimiser update trains: encoder and decoder together."""
        return {"vae": [p for p in self.parameters() if p.requires_grad]}

    def training_step(self, images: torch.Tensor,
                      update: Callable[[str, torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One step on a batch of good images: sample z (reparameterised), rebuild, update."""
        mean, log_var = self.encode(images)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        terms = self.losses(images, self.decode(z), mean, log_var)
        update("vae", terms["loss"])
        return terms
