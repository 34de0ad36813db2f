"""Frozen timm CNN (EfficientNet family) exposed as token maps, so a Dinomaly decoder can use it."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pretrained import create_encoder_model


def orthonormal_embedding(in_channels: int, dim: int, seed: int) -> torch.Tensor:
    """[in_channels, dim] with orthonormal rows: embeds features in `dim` keeping their geometry."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, in_channels, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)  # [dim, in_channels], orthonormal columns
    return q.T.contiguous().float()


class CNNEncoder(nn.Module):
    """Frozen CNN whose tapped blocks become tokens of one grid and one width.

    Blocks are numbered in order through all stages (EfficientNet-Lite0 has 16).
    Each tapped block's map is resized to the grid of `grid_stride` and embedded
    into `dim` channels by a fixed orthonormal matrix: cosine distances inside a
    tap are preserved exactly, and taps of different widths can be averaged.
    """

    # convolutions run faster on channels-last (NHWC) tensors; inference moves model and inputs to it
    channels_last = True

    def __init__(
        self,
        model_name: str,
        taps: Sequence[int],
        input_size: int = 256,
        grid_stride: int = 16,
        dim: int | None = None,
        num_heads: int = 4,
        pretrained: bool = True,
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        cnn = create_encoder_model(model_name, pretrained=pretrained, weights=weights,
                                   **dict(model_kwargs or {}))
        if not all(hasattr(cnn, name) for name in ("conv_stem", "bn1", "blocks")):
            raise ValueError(f"{model_name}: CNNEncoder supports timm's EfficientNet/MobileNet "
                             "family (conv_stem, bn1, blocks)")
        all_blocks = [block for stage in cnn.blocks for block in stage]
        self.taps = sorted(int(t) for t in taps)
        if self.taps[0] < 0 or self.taps[-1] >= len(all_blocks):
            raise ValueError(f"taps {self.taps} out of range for {len(all_blocks)} blocks")
        if input_size % grid_stride:
            raise ValueError(f"input_size {input_size} must be a multiple of grid_stride {grid_stride}")
        self.stem = nn.Sequential(cnn.conv_stem, cnn.bn1)
        self.blocks = nn.Sequential(*all_blocks[: self.taps[-1] + 1])
        self.input_size = input_size
        self.grid_size = input_size // grid_stride
        self.num_heads = num_heads
        self.num_prefix_tokens = 0
        mean, std = cnn.pretrained_cfg["mean"], cnn.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        channels = self._tap_channels()
        self.embed_dim = dim or max(channels)
        if self.embed_dim < max(channels):
            raise ValueError(f"dim {self.embed_dim} is narrower than a tapped block ({max(channels)} channels)")
        if self.embed_dim % num_heads:
            raise ValueError(f"dim {self.embed_dim} must be divisible by num_heads {num_heads}")
        for i, c in enumerate(channels):
            self.register_buffer(f"embedding_{i}", orthonormal_embedding(c, self.embed_dim, seed=i))
        self.eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def _tap_channels(self) -> list[int]:
        probe = torch.zeros(1, 3, 64, 64)
        return [m.shape[1] for m in self._tap_maps(probe)]

    def _tap_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> one [B, grid*grid, dim] tensor per tap."""
        x = (images - self.mean) / self.std
        grid = (self.grid_size, self.grid_size)
        tokens = []
        for i, feature_map in enumerate(self._tap_maps(x)):
            # antialias averages finer maps down to the grid instead of sampling them; it runs in
            # float32 because the CPU has no bf16 kernel for it (a no-op outside autocast)
            resized = F.interpolate(feature_map.float(), size=grid, mode="bilinear", align_corners=False,
                                    antialias=feature_map.shape[-1] > grid[-1])
            flat = resized.flatten(2).transpose(1, 2)  # [B, grid*grid, C]
            tokens.append(flat @ getattr(self, f"embedding_{i}"))  # [B, grid*grid, dim]
        return tokens
