"""Scoring many images with a model: batched, with a progress bar, unreadable files reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..data.datamodule import Sample, Tiling, image_tensor
from ..data.tiling import TileGrid, cut_tiles, stitch_batch
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


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Iterable[np.ndarray], device: torch.device, *,
                   batch_size: int, total: int | None = None, description: str = "score",
                   tiling: Tiling | None = None) -> np.ndarray:
    """Scores [N] of in-memory float [H, W, 3] images (made on the fly, e.g. synthetic defects).

    tiling: score each image in tiles, as a tiled loader would (the highest tile score).
    """
    model.to(device).eval()
    if tiling is not None and tiling.enabled:
        return _predict_images_tiled(model, images, device, tiling, batch_size=batch_size, total=total,
                                     description=description)
    scores: list[np.ndarray] = []

    def flush(batch: list[torch.Tensor]) -> None:
        _, batch_scores = model.predict(torch.stack(batch).to(device))
        scores.append(batch_scores.float().cpu().numpy())
        bar.advance(task, len(batch))
        batch.clear()

    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        batch: list[torch.Tensor] = []
        for image in images:
            batch.append(image_tensor(image, model.input_size))
            if len(batch) == batch_size:
                flush(batch)
        if batch:
            flush(batch)
    return np.concatenate(scores) if scores else np.zeros(0)


@torch.no_grad()
def encoder_embeddings(model: torch.nn.Module, loader, device: torch.device, *,
                       description: str = "features") -> dict[int, np.ndarray]:
    """One unit-length vector per readable sample: the encoder's taps, each averaged over its tokens.

    Distances between these say how alike two whole images look to the frozen
    encoder, independently of what the detector learnt on top of it.
    """
    model.to(device).eval()
    embeddings: dict[int, np.ndarray] = {}
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(loader.dataset))
        for batch in loader:
            if batch["images"] is not None:
                taps = model.encoder(batch["images"].to(device))  # list of [B, tokens, D]
                pooled = torch.cat([tap.float().mean(dim=1) for tap in taps], dim=1)  # [B, sum D]
                if "grids" in batch:  # tiles of one image at a time: the image's vector is their mean
                    pooled = torch.stack([part.mean(dim=0) for part in pooled.split([len(g) for g in batch["grids"]])])
                pooled = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
                for index, vector in zip(batch["indices"], pooled):
                    embeddings[index] = vector
            bar.advance(task, len(batch["indices"]) + len(batch["errors"]))
    return embeddings


def _predict_images_tiled(model: torch.nn.Module, images: Iterable[np.ndarray], device: torch.device,
                          tiling: Tiling, *, batch_size: int, total: int | None, description: str) -> np.ndarray:
    scores: list[float] = []
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for image in images:
            grid = TileGrid.for_image(*image.shape[:2], tiling.tile, tiling.overlap)
            tiles = cut_tiles(image, grid, model.input_size)
            scores.append(max(float(model.predict(chunk.to(device))[1].max()) for chunk in tiles.split(batch_size)))
            bar.advance(task, 1)
    return np.array(scores, dtype=np.float32)
