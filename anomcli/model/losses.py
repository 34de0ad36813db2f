"""Training losses, kept out of the models' forward passes."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def hard_mining_fraction(step: int, *, final: float = 0.9, ramp_steps: int = 1000) -> float:
    """Dinomaly's p: the share of points treated as hard, ramping 0 -> `final` over `ramp_steps`."""
    if ramp_steps <= 0:
        return final
    return min(final, final * step / ramp_steps)


def scale_easy_point_gradients(decoded: torch.Tensor, point_distance: torch.Tensor,
                               hard_fraction: float, factor: float) -> None:
    """Scale by `factor` the gradient reaching `decoded` at points that are already well reconstructed.

    Points whose distance is below the (1 - hard_fraction) quantile of the batch
    are "easy"; at hard_fraction = 0 no point is easy and nothing changes.
    """
    flat = point_distance.flatten()
    keep = max(1, int(flat.numel() * (1.0 - hard_fraction)))
    threshold = flat.topk(keep).values[-1]
    easy = (point_distance < threshold).expand_as(decoded)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[easy] *= factor
        return grad

    decoded.register_hook(hook)


def global_cosine_loss(encoded: Sequence[torch.Tensor], decoded: Sequence[torch.Tensor], *,
                       hard_fraction: float = 0.0, easy_factor: float = 0.1) -> torch.Tensor:
    """Dinomaly's loss: per group, 1 - cosine of each image's flattened feature map, averaged.

    encoded / decoded: one [B, D, h, w] map per group; the encoder side is a fixed target.
    """
    total = 0.0
    for target, prediction in zip(encoded, decoded):
        target = target.detach()
        if hard_fraction > 0 and prediction.requires_grad:
            with torch.no_grad():
                point_distance = 1 - F.cosine_similarity(target, prediction, dim=1).unsqueeze(1)
            scale_easy_point_gradients(prediction, point_distance, hard_fraction, easy_factor)
        cosine = F.cosine_similarity(target.flatten(1), prediction.flatten(1), dim=1)
        total = total + (1 - cosine).mean()
    return total / len(encoded)


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) summed over the latent dimensions, averaged over the batch.

    mean, log_var: [B, latent_dim]. Closed form: 0.5 * sum(mean^2 + var - 1 - log_var).
    """
    return 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(dim=1).mean()


def tap_cosine_distance(target: Sequence[torch.Tensor], prediction: Sequence[torch.Tensor],
                        num_prefix_tokens: int = 0) -> torch.Tensor:
    """Mean over taps, tokens and batch of 1 - cosine between two lists of [B, prefix + N, D] taps.

    Prefix tokens (class, registers) are left out: they describe the whole image, not a place in it.
    """
    total = 0.0
    for wanted, got in zip(target, prediction):
        wanted, got = wanted[:, num_prefix_tokens:], got[:, num_prefix_tokens:]  # [B, N, D]
        total = total + (1 - F.cosine_similarity(wanted.detach(), got, dim=-1)).mean()
    return total / len(target)
