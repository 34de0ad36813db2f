"""Scoring many images with a model: batched, with a progress bar, unreadable files reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.datamodule import Sample
from ..data.tiling import stitch_batch
from .progress import progress_bar


@dataclass
class Predictions:
    """Scores and maps at the model's input resolution; `errors` maps sample index -> reason."""

    samples: list[Sample]
    scores: dict[int, float] = field(default_factory=dict)
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def scored_indices(self) -> list[int]:
        return sorted(self.scores)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, *, keep_maps: bool = True,
            on_batch: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None,
            description: str = "score") -> Predictions:
    """Run `model.predict` over a loader of samples.

    on_batch(indices, maps [B, S, S], scores [B]) lets a caller write outputs as it goes
    instead of holding every map in memory. With a tiled loader (data.tiling), the maps
    are one stitched [h, w] map per image, in a list.
    """
    model.to(device).eval()
    samples: Sequence[Sample] = loader.dataset.samples
    result = Predictions(list(samples))
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(samples))
        for batch in loader:
            for index, reason in batch["errors"]:
                result.errors[index] = reason
            if batch["images"] is not None:
                if "grids" in batch:
                    maps, scores = _predict_tiles(model, batch, device, loader.dataset.tiles_per_forward)
                else:
                    maps, scores = model.predict(batch["images"].to(device, non_blocking=True))
                    maps = maps[:, 0].float().cpu().numpy()
                    scores = scores.float().cpu().numpy()
                for index, size, amap, score in zip(batch["indices"], batch["sizes"], maps, scores):
                    result.scores[index] = float(score)
                    result.sizes[index] = tuple(size)
                    if keep_maps:
                        result.maps[index] = amap.astype(np.float16)
                if on_batch is not None:
                    on_batch(batch["indices"], maps, scores)
            bar.advance(task, len(batch["indices"]) + len(batch["errors"]))
    return result


def _predict_tiles(model: torch.nn.Module, batch: dict, device: torch.device,
                   tiles_per_forward: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Score the tiles of the batch's images a chunk at a time, then stitch one map per image."""
    outputs = [model.predict(chunk.to(device, non_blocking=True))
               for chunk in batch["images"].split(tiles_per_forward)]
    maps = torch.cat([m for m, _ in outputs])  # [tiles, 1, S, S]
    scores = torch.cat([s for _, s in outputs])  # [tiles]
    return stitch_batch(maps, scores, batch["grids"], model.input_size)
