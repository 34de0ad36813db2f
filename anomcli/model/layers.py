"""Small blocks shared by the detectors: initialisation, map resizing and smoothing,
top-fraction scoring, DCGAN convolution stacks."""

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


def gaussian_blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] float64 matrix of a 1-D Gaussian blur with reflected borders (scipy's "mirror").

    sigma <= 0 means no blur, and a blur too wide for the map (radius >= size) cannot reflect
    and is left out: both give the identity.
    """
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    kernel = gaussian_kernel1d(sigma).double()
    radius = kernel.numel() // 2
    if radius >= size:
        return torch.eye(size, dtype=torch.float64)
    taps = torch.arange(size).unsqueeze(1) + torch.arange(-radius, radius + 1)  # [size, 2r + 1]
    taps = taps.abs()  # reflect at the start ...
    taps = torch.where(taps > size - 1, 2 * (size - 1) - taps, taps)  # ... and at the end
    matrix = torch.zeros(size, size, dtype=torch.float64)
    return matrix.scatter_add_(1, taps, kernel.expand(size, -1).contiguous())


def linear_resize_matrix(in_size: int, out_size: int, align_corners: bool) -> torch.Tensor:
    """[out_size, in_size] float64 matrix of 1-D linear resizing, as F.interpolate computes it."""
    impulses = torch.eye(in_size, dtype=torch.float64).unsqueeze(1)  # [in, 1, in]: one unit per row
    resized = F.interpolate(impulses, size=out_size, mode="linear", align_corners=align_corners)
    return resized[:, 0].T


class SmoothUpsample(nn.Module):
    """[B, 1, n, n] maps -> bilinear resize to [B, 1, S, S], then Gaussian smoothing (reflected borders,
    sigma in output pixels; 0: none).

    Both steps are linear and separable, so together they are one [S, n] matrix M applied to
    each axis, M @ map @ M^T: two small matrix products instead of a resize and a long
    convolution per axis, 30 to 150 times faster on a 2-core CPU at 256-392 px.
    """

    def __init__(self, in_size: int, out_size: int, sigma: float, align_corners: bool = False):
        super().__init__()
        self.sigma = sigma
        resize = linear_resize_matrix(in_size, out_size, align_corners)
        self.register_buffer("matrix", (gaussian_blur_matrix(out_size, sigma) @ resize).float(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.matrix @ maps @ self.matrix.T


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest `fraction` of each map's pixels: [B, ...] -> [B]."""
    flat = maps.flatten(1)
    k = max(1, int(math.floor(flat.shape[1] * fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)


# --- DCGAN convolution stacks (Radford et al., ICLR 2016), the shape GANomaly builds on -----

def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: convolutions N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def pyramid_widths(input_size: int, width: int, max_width: int) -> list[int]:
    """Channels of the stride-2 stages that take an input_size image down to 4x4: width, 2 width, ...

    input_size must be a power of two of at least 8 (every stage halves the side exactly).
    """
    if input_size < 8 or input_size & (input_size - 1):
        raise ValueError(f"input_size must be a power of two >= 8 for a DCGAN stack, got {input_size}")
    if not 1 <= width <= max_width:
        raise ValueError(f"need 1 <= width <= max_width, got width {width}, max_width {max_width}")
    stages = int(math.log2(input_size // 4))
    return [min(width * 2 ** i, max_width) for i in range(stages)]


class DCGANEncoder(nn.Module):
    """[B, C, S, S] -> [B, out_channels]: stride-2 4x4 convolutions down to 4x4, then one 4x4 convolution.

    `features` is the 4x4 map before the last convolution (a discriminator's feature layer).
    """

    def __init__(self, input_size: int, in_channels: int, out_channels: int, width: int = 32,
                 max_width: int = 256):
        super().__init__()
        widths = pyramid_widths(input_size, width, max_width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for narrow, wide in zip(widths, widths[1:]):
            layers += [nn.Conv2d(narrow, wide, 4, 2, 1, bias=False), nn.BatchNorm2d(wide), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)  # [B, widths[-1], 4, 4]
        self.head = nn.Conv2d(widths[-1], out_channels, 4, 1, 0, bias=False)  # [B, out, 1, 1]
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)  # [B, out_channels]


class DCGANDecoder(nn.Module):
    """[B, latent_dim] -> [B, out_channels, S, S] in [-1, 1]: the mirror image of DCGANEncoder."""

    def __init__(self, input_size: int, latent_dim: int, out_channels: int, width: int = 32,
                 max_width: int = 256):
        super().__init__()
        widths = pyramid_widths(input_size, width, max_width)[::-1]  # widest first
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]  # 1x1 -> 4x4
        for wide, narrow in zip(widths, widths[1:]):  # 4x4 -> S/2
            layers += [nn.ConvTranspose2d(wide, narrow, 4, 2, 1, bias=False), nn.BatchNorm2d(narrow), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]  # S/2 -> S
        self.layers = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z[:, :, None, None])  # [B, latent, 1, 1] -> [B, out, S, S]
