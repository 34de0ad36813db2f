"""Bottlenecks between encoder and decoder: `conf/model/bottleneck/*.yaml` build these."""

from .noisy_mlp import NoisyMLP

__all__ = ["NoisyMLP"]
