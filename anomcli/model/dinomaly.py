"""Dinomaly: a frozen encoder, a noisy bottleneck and a linear-attention decoder that
reconstructs the encoder's middle layers; anomalies are where the two disagree.

Guo et al., "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised
Anomaly Detection", CVPR 2025.

    images -> encoder taps (8 middle blocks, frozen)
           -> mean of taps -> noisy MLP -> decoder blocks (8)
    group g: mean of encoder taps in encoder_groups[g]  vs  mean of decoder blocks in decoder_groups[g]
    anomaly map = mean over groups of (1 - cosine over channels), upsampled and smoothed
    image score = mean of the top 1 % of the map
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SmoothUpsample, top_fraction_mean

# Dinomaly smooths with sigma 4 on 256-px maps; sigma is scaled with the map size.
REFERENCE_MAP_SIZE = 256


class Dinomaly(nn.Module):
    """Encoder -> bottleneck -> decoder; the stages can be called one by one.

    encoder: a frozen module returning a list of [B, prefix + h*w, D] tap tensors and
        exposing `embed_dim`, `num_heads`, `num_prefix_tokens`, `grid_size`, `input_size`.
    bottleneck, decoder: builders called with the encoder's width (Hydra `_partial_`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: Callable[..., nn.Module],
        decoder: Callable[..., nn.Module],
        encoder_groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)),
        decoder_groups: Sequence[Sequence[int]] = ((4, 5, 6, 7), (0, 1, 2, 3)),
        map_sigma: float = 4.0,
        score_top_fraction: float = 0.01,
    ):
        super().__init__()
        if len(encoder_groups) != len(decoder_groups):
            raise ValueError("encoder_groups and decoder_groups must pair up one to one")
        self.encoder = encoder
        self.bottleneck = bottleneck(dim=encoder.embed_dim)
        self.decoder = decoder(dim=encoder.embed_dim, num_heads=encoder.num_heads)
        self.encoder_groups = [list(g) for g in encoder_groups]
        self.decoder_groups = [list(g) for g in decoder_groups]
        num_taps, depth = len(encoder.taps), len(self.decoder.blocks)
        if any(i >= num_taps for g in self.encoder_groups for i in g):
            raise ValueError(f"encoder_groups {self.encoder_groups} index past the {num_taps} taps")
        if any(i >= depth for g in self.decoder_groups for i in g):
            raise ValueError(f"decoder_groups {self.decoder_groups} index past the {depth} decoder blocks")
        self.input_size = encoder.input_size
        self.score_top_fraction = score_top_fraction
        self.upsample = SmoothUpsample(encoder.grid_size, self.input_size,
                                       sigma=map_sigma * self.input_size / REFERENCE_MAP_SIZE, align_corners=True)

    def train(self, mode: bool = True) -> "Dinomaly":
        super().train(mode)
        self.encoder.eval()  # frozen: its batch norm / dropout never train
        return self

    # --- stages -------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, S, S] in [0, 1] -> encoder taps, each [B, prefix + h*w, D]."""
        return self.encoder(images)

    def decode(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder taps -> every decoder block's output, each [B, prefix + h*w, D]."""
        fused = torch.stack(list(taps)).mean(dim=0)
        return self.decoder(self.bottleneck(fused))

    def group_maps(self, tokens: Sequence[torch.Tensor], groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Average the members of each group and drop prefix tokens: one [B, D, h, w] map per group."""
        maps = []
        for group in groups:
            x = torch.stack([tokens[i] for i in group]).mean(dim=0)
            x = x[:, self.encoder.num_prefix_tokens:]  # [B, h*w, D]
            B, N, D = x.shape
            side = self.encoder.grid_size
            maps.append(x.transpose(1, 2).reshape(B, D, side, side))  # [B, D, h, w]
        return maps

    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images [B, 3, S, S], or their taps from `encode` (the frozen encoder's output can be
        computed once and reused) -> (encoder group maps, decoder group maps), each a list of [B, D, h, w]."""
        taps = self.encode(inputs) if torch.is_tensor(inputs) else inputs
        decoded = self.decode(taps)
        return self.group_maps(taps, self.encoder_groups), self.group_maps(decoded, self.decoder_groups)

    def group_distances(self, encoded: Sequence[torch.Tensor], decoded: Sequence[torch.Tensor]) -> torch.Tensor:
        """Group maps -> [B, groups, h, w]: 1 - cosine over channels, one map per group."""
        return torch.stack([1 - F.cosine_similarity(target, prediction, dim=1)
                            for target, prediction in zip(encoded, decoded)], dim=1)

    def distance_map(self, encoded: Sequence[torch.Tensor], decoded: Sequence[torch.Tensor]) -> torch.Tensor:
        """Group maps -> [B, 1, h, w]: the group distances, averaged."""
        return self.group_distances(encoded, decoded).mean(dim=1, keepdim=True)

    def anomaly_map(self, encoded: Sequence[torch.Tensor], decoded: Sequence[torch.Tensor]) -> torch.Tensor:
        """Group maps -> [B, 1, S, S] anomaly map at the input resolution, smoothed.

        Upsampling and smoothing are linear, so averaging the groups before them gives the same map."""
        return self.upsample(self.distance_map(encoded, decoded))

    def score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> [B] image scores: the mean of the top fraction of pixels."""
        return top_fraction_mean(anomaly_map, self.score_top_fraction)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (anomaly maps [B, 1, S, S], scores [B])."""
        encoded, decoded = self(images)
        # under reduced-precision autocast only the networks run in half precision:
        # cosine distances, upsampling, smoothing and the top-1 % mean stay in float32
        with torch.autocast(images.device.type, enabled=False):
            maps = self.anomaly_map([x.float() for x in encoded], [x.float() for x in decoded])
            return maps, self.score(maps)
