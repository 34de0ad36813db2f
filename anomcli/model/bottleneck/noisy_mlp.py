"""The noisy bottleneck of Dinomaly (Guo et al., CVPR 2025): an MLP whose dropout is the noise."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import init_vit_weights


class NoisyMLP(nn.Module):
    """D -> hidden_ratio*D -> D with GELU; dropout before each linear layer and on the output.

    The dropout stays on during training only; it keeps the decoder from learning
    an identity mapping that would also reconstruct anomalies.
    """

    def __init__(self, dim: int, dropout: float = 0.2, hidden_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.apply(init_vit_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.drop(x))
        x = self.fc2(self.drop(self.act(x)))
        return self.drop(x)
