"""Scoring many images with a model: batched, with a progress bar, unreadable files reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..data.datamodule import Sample, image_tensor
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
    instead of holding every map in memory.
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


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Iterable[np.ndarray], device: torch.device, *,
                   batch_size: int, total: int | None = None, description: str = "score") -> np.ndarray:
    """Scores [N] of in-memory float [H, W, 3] images (made on the fly, e.g. synthetic defects)."""
    model.to(device).eval()
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
                pooled = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
                for index, vector in zip(batch["indices"], pooled):
                    embeddings[index] = vector
            bar.advance(task, len(batch["indices"]) + len(batch["errors"]))
    return embeddings
