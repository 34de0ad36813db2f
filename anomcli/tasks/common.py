"""Pieces the task entry points share: devices, data resolution, statistics, output writers."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..data.datamodule import DatasetLayoutError, FolderDataModule, Sample
from ..data.image_io import ImageReadError, image_size, load_image, load_mask
from ..engine.checkpoint import Checkpoint, load_checkpoint
from ..engine.evaluate import Predictions, predict
from ..engine.fit import resolve_device
from ..visualize import resize_map, save_overlay

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A request that cannot be carried out as asked; the message says what to do."""


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def safe_output_path(base: Path, relative: Path) -> Path:
    """`base / relative`, refused when it would land outside `base` (absolute, `..`, a link leading out).

    Output names come from input file names, which this run does not control.
    """
    target = base / relative
    if relative.is_absolute() or ".." in relative.parts or \
            not target.resolve().is_relative_to(base.resolve()):
        raise UsageError(f"refusing to write {target}: the name {str(relative)!r} leads outside {base}")
    return target


def heatmap_names(files: list[Path], root: Path) -> list[Path]:
    """One distinct output name per input file: its path under root, with .png.

    Sub-folders keep same-named files apart; `a.png` and `a.jpg` in one folder
    become `a.png` and `a_jpg.png`. Names are compared case-blind, for
    file systems that are.
    """
    names, taken = [], set()
    for path in files:
        relative = _relative(path, root)
        folder = Path(*[part for part in relative.parts[:-1] if part not in ("", ".", "..")])
        stem, extension = relative.stem, relative.suffix.lstrip(".").lower()
        candidates = [folder / f"{stem}.png", folder / f"{stem}_{extension}.png"]
        candidates += (folder / f"{stem}_{extension}_{n}.png" for n in range(2, len(files) + 2))
        name = next(c for c in candidates if str(c).casefold() not in taken)
        taken.add(str(name).casefold())
        names.append(name)
    return names


def _relative(path: Path, root: Path) -> Path:
    """The path under the input root, so same-named files in sub-folders keep distinct outputs."""
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def warn_if_random_encoder(pretrained: bool) -> None:
    if not pretrained:
        log.warning("!" * 72)
        log.warning("The encoder has RANDOM weights (model.encoder.pretrained=false): this is for "
                    "tests only, and every score and map it produces is MEANINGLESS.")
        log.warning("!" * 72)


def data_module_for(data_cfg: DictConfig, checkpoint: Checkpoint) -> FolderDataModule:
    """The data the checkpoint was trained with, unless the command line picked other data.

    `data=...` picks a whole data config; with the default (`from_checkpoint`) the
    checkpoint's own data config is used and any non-null field (data.root=...) overrides it.
    """
    requested_tiling = data_cfg.get("tiling") or {}
    if data_cfg.get("_target_") is None:
        trained = checkpoint.config.get("data")
        if trained is None:
            raise UsageError("the checkpoint records no data config: pick one with data=<name>")
        overrides = {k: v for k, v in OmegaConf.to_container(data_cfg).items() if v is not None and k != "tiling"}
        data_cfg = OmegaConf.merge(trained, overrides)
    data_cfg = OmegaConf.merge(data_cfg, {"tiling": tiling_for(requested_tiling, checkpoint)})
    datamodule = instantiate(data_cfg)
    datamodule.prepare()
    return datamodule


def tiling_for(requested, checkpoint: Checkpoint) -> dict:
    """The tiling a checkpoint was trained with, with the fields the command line set (non-null)."""
    trained = checkpoint.config.get("data", {}).get("tiling") or {}
    tiling = {"tile": 0, "overlap": 0.25, **OmegaConf.to_container(OmegaConf.create(dict(trained)))}
    tiling.update({k: v for k, v in dict(requested).items() if v is not None})
    return tiling


def score_test_split(cfg: DictConfig, *, keep_maps: bool, description: str):
    """Load cfg.ckpt, resolve its data, score the test split: (checkpoint, datamodule, samples, predictions)."""
    device = resolve_device(cfg.device)
    checkpoint = load_checkpoint(cfg.ckpt, device)
    warn_if_random_encoder(checkpoint.meta.get("encoder_pretrained", True))
    datamodule = data_module_for(cfg.data, checkpoint)
    samples = datamodule.test_samples()
    check_mask_sizes(samples)
    predictions = predict(checkpoint.model, datamodule.loader(samples, checkpoint.model.input_size), device,
                          keep_maps=keep_maps, description=description, precision=cfg.precision,
                          compile_model=cfg.compile)
    return checkpoint, datamodule, samples, predictions


def training_statistics(predictions: Predictions) -> dict:
    """Score statistics and the fixed heatmap colour scale, from maps of training images.

    The colour scale runs from the median training pixel (dark) to twice the distance
    to the highest training pixel, so good surfaces stay in the lower half of the scale.
    """
    scores = np.array([predictions.scores[i] for i in predictions.scored_indices()])
    pixels = np.concatenate([m.ravel().astype(np.float32) for m in predictions.maps.values()])
    low, top = float(np.median(pixels)), float(pixels.max())
    return {
        "images": int(scores.size),
        "score": {"mean": float(scores.mean()), "std": float(scores.std()), "min": float(scores.min()),
                  "max": float(scores.max()),
                  **{f"q{q}": float(np.quantile(scores, q / 100)) for q in (50, 95, 99)}},
        "map_scale": {"low": low, "high": low + 2 * max(top - low, 1e-6)},
    }


def map_scale(checkpoint: Checkpoint) -> tuple[float, float]:
    scale = checkpoint.meta.get("train_statistics", {}).get("map_scale")
    if not scale:
        raise UsageError(f"{checkpoint.path} has no heatmap colour scale: it was saved before training "
                         "finished (continue it with trainer.resume=true), or run with heatmaps=none")
    return float(scale["low"]), float(scale["high"])


def check_mask_sizes(samples: list[Sample]) -> None:
    """Every mask readable and the size of its image, checked from headers before any scoring."""
    for sample in samples:
        if sample.mask_path is None:
            continue
        try:
            mask_height, mask_width = image_size(sample.mask_path)
        except ImageReadError as error:
            raise DatasetLayoutError(f"mask {sample.mask_path} cannot be read ({error}): "
                                     "replace it, or remove it to score that image without pixel metrics") from None
        try:
            height, width = image_size(sample.path)
        except ImageReadError:
            continue  # reported as an unreadable image when it is scored
        if (mask_height, mask_width) != (height, width):
            raise DatasetLayoutError(
                f"mask {sample.mask_path} is {mask_width}x{mask_height} but its image {sample.path} is "
                f"{width}x{height} (width x height): a mask must have its image's size; fix or remove it")


def mask_at(sample: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask resized to the map's (h, w) (bilinear, then >= 0.5); zeros for good images."""
    if sample.label == 0:
        return np.zeros(shape, dtype=bool)
    if sample.mask_path is None:
        return None
    mask = load_mask(sample.mask_path)
    return resize_map(mask.astype(np.float32), *shape) >= 0.5


def write_heatmap(path: Path, sample: Sample, anomaly_map: np.ndarray, scale: tuple[float, float],
                  draw_mask: bool = False) -> None:
    """Overlay at the original image size; the mask outline is drawn when there is one."""
    try:
        image = load_image(sample.path)
        mask = load_mask(sample.mask_path, size=image.shape[:2]) if draw_mask and sample.mask_path else None
    except ImageReadError as error:
        log.warning("no heatmap for %s: %s", sample.path, error)
        return
    save_overlay(path, image, anomaly_map.astype(np.float32), *scale, mask=mask)


def write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

