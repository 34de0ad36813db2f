"""Small blocks shared by the detectors: initialisation, Gaussian smoothing, top-fraction scoring."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_vit_weights(module: nn.Module) -> None:
    """ViT initialisation (truncated normal, std 0.02) for trainable linear layers."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius int(4 sigma + 0.5), as scipy.ndimage uses."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of [B, 1, H, W] maps with reflected borders."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.register_buffer("kernel", gaussian_kernel1d(sigma), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        radius = self.kernel.numel() // 2
        if radius >= min(maps.shape[-2:]):  # reflect padding needs a map wider than the kernel radius
            return maps
        k = self.kernel.to(maps.dtype)
        x = F.pad(maps, (radius, radius, 0, 0), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, radius, radius), mode="reflect")
        return F.conv2d(x, k.view(1, 1, -1, 1))


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest `fraction` of each map's pixels: [B, ...] -> [B]."""
    flat = maps.flatten(1)
    k = max(1, int(math.floor(flat.shape[1] * fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)
