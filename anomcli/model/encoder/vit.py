"""Frozen timm Vision Transformer (DINOv2 with registers) returning chosen blocks' raw outputs."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .pretrained import create_encoder_model


class ViTEncoder(nn.Module):
    """Frozen ViT; `forward` returns the un-normalised output of each tapped block.

    Class and register tokens stay in the token sequence (the decoder sees them
    too); `num_prefix_tokens` tells the model how many to drop when it forms maps.
    Blocks after the last tap and the final norm are removed: they never run.
    """

    def __init__(
        self,
        model_name: str,
        taps: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9),
        input_size: int = 392,
        pretrained: bool = True,
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        vit = create_encoder_model(model_name, pretrained=pretrained, weights=weights,
                                   img_size=input_size, num_classes=0, **dict(model_kwargs or {}))
        patch_size = vit.patch_embed.patch_size[0]
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of the patch size {patch_size}")
        self.taps = sorted(int(t) for t in taps)
        if self.taps[0] < 0 or self.taps[-1] >= len(vit.blocks):
            raise ValueError(f"taps {self.taps} out of range for {len(vit.blocks)} blocks")
        self.input_size = input_size
        self.vit = vit
        vit.blocks = vit.blocks[: self.taps[-1] + 1]
        vit.norm, vit.fc_norm, vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.grid_size = input_size // patch_size
        mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> one [B, prefix + grid*grid, D] tensor per tap."""
        x = (images - self.mean) / self.std
        x = self.vit.patch_embed(x)
        x = self.vit._pos_embed(x)  # adds class + register tokens and position embeddings
        x = self.vit.norm_pre(x)
        outputs = []
        for index, block in enumerate(self.vit.blocks):
            x = block(x)
            if index in self.taps:
                outputs.append(x)
        return outputs
