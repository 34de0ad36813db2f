"""GANomaly: an encoder-decoder-encoder generator trained against a discriminator on good images;
an image whose reconstruction's code drifts from its own code is anomalous.

Akcay, Atapour-Abarghouei & Breckon, "GANomaly: Semi-Supervised Anomaly Detection via
Adversarial Training", ACCV 2018. Networks are DCGAN stacks (Radford et al., ICLR 2016).

    generator:      x -> input_encoder -> z -> decoder -> x_hat -> output_encoder -> z_hat
    discriminator:  DCGAN encoder to one logit; its last 4x4 feature map f() is matched
    generator loss  = adversarial_weight * |f(x) - f(x_hat)|^2      (feature matching)
                    + contextual_weight  * |x - x_hat|_1            (reconstruction)
                    + latent_weight      * |z - z_hat|^2            (encoder consistency)
    discriminator loss = binary cross-entropy, real x -> 1, x_hat -> 0 (re-initialised when it
                         falls below discriminator_reset_below, as the paper does)
    image score = mean over the code of (z - z_hat)^2 (the paper's A(x), without its min-max over the test set)
    anomaly map = |x - x_hat| averaged over colour channels, smoothed
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DCGANDecoder, DCGANEncoder, SmoothUpsample, init_dcgan_weights

# maps are smoothed with sigma 4 on 256-px maps, as Dinomaly's; sigma is scaled with the map size.
REFERENCE_MAP_SIZE = 256


class GANomaly(nn.Module):
    """Generator (encoder, decoder, encoder) and discriminator, trained on good images only.

    input_size: side of the square input; a power of two (every stage halves it down to 4x4).
    latent_dim: size of the codes z and z_hat (the paper's nz, 100).
    width, max_width: channels of the first convolution stage, doubling per stage up to max_width.
    adversarial_weight, contextual_weight, latent_weight: the paper's w_adv, w_con, w_enc (1, 50, 1).
    discriminator_reset_below: re-initialise the discriminator when its loss falls below this
        (it has won, and its gradients no longer teach the generator); 0 never resets.
    map_sigma: Gaussian smoothing of the anomaly map at 256 px; scaled with the input size.
    """

    def __init__(
        self,
        input_size: int = 256,
        latent_dim: int = 100,
        width: int = 32,
        max_width: int = 256,
        adversarial_weight: float = 1.0,
        contextual_weight: float = 50.0,
        latent_weight: float = 1.0,
        discriminator_reset_below: float = 1e-5,
        map_sigma: float = 4.0,
    ):
        super().__init__()
        if min(adversarial_weight, contextual_weight, latent_weight, discriminator_reset_below) < 0:
            raise ValueError("loss weights and discriminator_reset_below must be >= 0")
        self.input_size = input_size
        self.latent_dim = latent_dim
        self.adversarial_weight = adversarial_weight
        self.contextual_weight = contextual_weight
        self.latent_weight = latent_weight
        self.discriminator_reset_below = discriminator_reset_below
        self.input_encoder = DCGANEncoder(input_size, 3, latent_dim, width, max_width)  # G_E
        self.decoder = DCGANDecoder(input_size, latent_dim, 3, width, max_width)  # G_D
        self.output_encoder = DCGANEncoder(input_size, 3, latent_dim, width, max_width)  # E
        self.discriminator = DCGANEncoder(input_size, 3, 1, width, max_width)  # D: one logit
        self.blur = SmoothUpsample(input_size, input_size, sigma=map_sigma * input_size / REFERENCE_MAP_SIZE)
        # the networks see [-1, 1] (tanh output); kept as buffers so the checkpoint meta can report them
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    # --- stages -------------------------------------------------------------

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1], the range of the decoder's tanh."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> (z [B, latent], x_hat [B, 3, S, S] in [-1, 1], z_hat [B, latent])."""
        z = self.input_encoder(self.normalise(images))
        reconstruction = self.decoder(z)
        return z, reconstruction, self.output_encoder(reconstruction)

    def anomaly_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], x_hat in [-1, 1] -> [B, 1, S, S] smoothed absolute error in [0, 1] units."""
        error = (images - (reconstruction * self.std + self.mean)).abs().mean(dim=1, keepdim=True)
        return self.blur(error)

    def score(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """[B] image scores: mean squared distance between the two codes."""
        return (z - z_hat).square().mean(dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (anomaly maps [B, 1, S, S], scores [B])."""
        z, reconstruction, z_hat = self(images)
        return self.anomaly_map(images, reconstruction), self.score(z, z_hat)

    # --- training -------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """What each optimiser update trains: the generator's three networks, or the discriminator."""
        generator = [*self.input_encoder.parameters(), *self.decoder.parameters(),
                     *self.output_encoder.parameters()]
        return {"generator": generator, "discriminator": list(self.discriminator.parameters())}

    def training_step(self, images: torch.Tensor,
                      update: Callable[[str, torch.Tensor], None]) -> dict[str, torch.Tensor]:
        """One step on a batch of good images: update the generator, then the discriminator."""
        real = self.normalise(images)
        z, fake, z_hat = self(images)
        with torch.no_grad():
            real_features = self.discriminator.features(real)  # [B, C, 4, 4], a fixed target here
        adversarial = (self.discriminator.features(fake) - real_features).square().mean()
        contextual = (real - fake).abs().mean()  # L1 in [-1, 1] units, as the paper's w_con = 50 assumes
        latent = (z - z_hat).square().mean()
        generator = (self.adversarial_weight * adversarial + self.contextual_weight * contextual
                     + self.latent_weight * latent)
        update("generator", generator)

        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake.detach())  # [B, 1] each
        discriminator = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                               + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
        update("discriminator", discriminator)
        if discriminator.item() < self.discriminator_reset_below:
            self.discriminator.apply(init_dcgan_weights)
        return {"loss": generator, "adversarial": adversarial, "contextual": contextual, "latent": latent,
                "discriminator": discriminator}
