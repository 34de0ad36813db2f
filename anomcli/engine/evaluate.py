"""Scoring many images with a model: batched, with a progress bar, unreadable files reported.

Speed without changing results: `torch.inference_mode`, a loader that decodes
images in worker processes into pinned memory, channels-last memory for CNN
encoders, and optionally reduced-precision autocast and `torch.compile`. In
`fp32` the scores match the plain model to float rounding (tested within 1e-5);
`fp16` (CUDA) and `bf16` run the networks in half precision while the anomaly
map and the score are still computed in float32 (tests bound the difference).
`int8` (CPU) runs every linear layer with int8 weights and dynamically quantised
activations (torch's dynamic quantisation); convolutions stay float32.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..data.datamodule import Sample, Tiling, image_tensor
from ..data.tiling import TileGrid, cut_tiles, stitch_batch
from .progress import progress_bar

# precision -> autocast dtype (None: no autocast); "auto" is fp16 on CUDA and fp32 elsewhere;
# int8 quantises the linear layers' weights instead of autocasting
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": None}


class InferenceSettingsError(ValueError):
    """A precision or compile setting the device cannot honour."""


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> fp16 on CUDA, fp32 elsewhere; a precision the device lacks is a one-line error."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise InferenceSettingsError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise InferenceSettingsError("precision=fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if precision == "int8" and device.type != "cpu":
        raise InferenceSettingsError("precision=int8 (dynamic quantisation) runs on the CPU only; "
                                     "on CUDA use fp16")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_channels_last(model: torch.nn.Module) -> bool:
    """CNN encoders run faster on channels-last tensors (NHWC kernels); ViTs gain nothing."""
    return bool(getattr(getattr(model, "encoder", None), "channels_last", False))


def quantize_linear_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose nn.Linear layers hold int8 weights and quantise their inputs per batch."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch marks its eager quantisation API as deprecated and warns once per layer
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def prepare_for_inference(model: torch.nn.Module, device: torch.device, *, compile_model: bool = False,
                          precision: str = "fp32") -> Callable[[torch.Tensor], tuple]:
    """Move `model` to `device` in eval mode; returns the function that maps images to (maps, scores).

    With precision="int8" the function belongs to a quantised copy; `model` itself is left as it is."""
    model.to(device).eval()
    if precision == "int8":
        model = quantize_linear_layers(model)
    if uses_channels_last(model):
        model.to(memory_format=torch.channels_last)
    if not compile_model:
        return model.predict
    # compiled once per input shape; the first batch (and a smaller last batch) pay the compile time
    return torch.compile(model.predict, dynamic=False)


def predict(model: torch.nn.Module, loader, device: torch.device, *, keep_maps: bool = True,
            on_batch: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None,
            description: str = "score", precision: str = "fp32", compile_model: bool = False) -> Predictions:
    """Run `model.predict` over a loader of samples.

    on_batch(indices, maps [B, S, S], scores [B]) lets a caller write outputs as it goes
    instead of holding every map in memory. precision: auto | fp32 | fp16 | bf16 | int8. With a tiled
    loader (data.tiling), the maps are one stitched [h, w] map per image, in a list.
    """
    precision = resolve_precision(precision, device)
    run_model = prepare_for_inference(model, device, compile_model=compile_model, precision=precision)
    memory_format = torch.channels_last if uses_channels_last(model) else torch.contiguous_format
    samples: Sequence[Sample] = loader.dataset.samples
    result = Predictions(list(samples))
    with progress_bar() as bar, torch.inference_mode():
        task = bar.add_task(description, total=len(samples))
        for batch in loader:
            for index, reason in batch["errors"]:
                result.errors[index] = reason
            if batch["images"] is not None:
                if "grids" in batch:
                    maps, scores = _predict_tiles(run_model, batch, loader.dataset.tiles_per_forward,
                                                  model.input_size, device, precision, memory_format)
                else:
                    images = batch["images"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    with autocast(device, precision):
                        maps, scores = run_model(images)
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


def _predict_tiles(run_model, batch: dict, tiles_per_forward: int, input_size: int, device: torch.device,
                   precision, memory_format) -> tuple[list[np.ndarray], np.ndarray]:
    """Score the tiles of the batch's images a chunk at a time, then stitch one map per image."""
    outputs = []
    for chunk in batch["images"].split(tiles_per_forward):
        with autocast(device, precision):
            outputs.append(run_model(chunk.to(device, non_blocking=True).contiguous(memory_format=memory_format)))
    maps = torch.cat([m.float() for m, _ in outputs])  # [tiles, 1, S, S]
    scores = torch.cat([s.float() for _, s in outputs])  # [tiles]
    return stitch_batch(maps, scores, batch["grids"], input_size)


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
