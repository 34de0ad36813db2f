"""`anom validate`: score a labelled test split; metrics.json, scores.csv and heatmap overlays."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from omegaconf import DictConfig
from rich.table import Table

from .. import metrics
from ..engine.checkpoint import atomic_write_json
from ..engine.progress import results
from .common import map_scale, mask_at, output_dir, score_test_split, write_csv, write_heatmap

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    run_dir = output_dir(cfg)
    checkpoint, _, samples, predictions = score_test_split(cfg, keep_maps=True, description="validate")

    scored = predictions.scored_indices()
    labels = np.array([samples[i].label for i in scored])
    scores = np.array([predictions.scores[i] for i in scored])
    threshold = checkpoint.threshold["threshold"] if checkpoint.threshold else None
    result = {
        "image": metrics.image_metrics(labels, scores),
        "per_defect": _per_defect(samples, scored, labels, scores, threshold),
        "counts": {"images": len(samples), "scored": len(scored), "unreadable": len(predictions.errors),
                   "good": int((labels == 0).sum()), "defective": int((labels == 1).sum()),
                   **{f"type_{k}": v for k, v in sorted(Counter(samples[i].defect_type for i in scored).items())}},
    }
    pixel = _pixel_metrics(samples, scored, predictions)
    if pixel is not None:
        result["pixel"] = pixel
    if threshold is not None:
        result["operating_point"] = metrics.operating_point(labels, scores, threshold)
    atomic_write_json(run_dir / "metrics.json", result)

    write_csv(run_dir / "scores.csv", ["path", "defect_type", "label", "score"],
              ([str(samples[i].path), samples[i].defect_type, samples[i].label, f"{predictions.scores[i]:.6f}"]
               for i in scored))
    if cfg.heatmaps != "none":
        scale = map_scale(checkpoint)
        for i in scored:
            flagged = threshold is not None and predictions.scores[i] >= threshold
            if cfg.heatmaps == "all" or flagged or (threshold is None and samples[i].label == 1):
                sample = samples[i]
                write_heatmap(run_dir / "heatmaps" / sample.defect_type / f"{sample.path.stem}.png",
                              sample, predictions.maps[i], scale, draw_mask=True)
    for index, reason in predictions.errors.items():
        log.warning("could not score %s: %s", samples[index].path, reason)
    _print_summary(result, run_dir)
    return result


def _per_defect(samples, scored, labels, scores, threshold) -> dict:
    good = labels == 0
    types = sorted({samples[i].defect_type for i in scored} - {"good"})
    out = {}
    for defect in types:
        is_type = np.array([samples[i].defect_type == defect for i in scored])
        subset = good | is_type
        out[defect] = {
            "count": int(is_type.sum()),
            "auroc": metrics.image_metrics(labels[subset], scores[subset])["auroc"],
            "recall": float((scores[is_type] >= threshold).mean()) if threshold is not None else None,
        }
    return out


def _pixel_metrics(samples, scored, predictions) -> dict | None:
    """At the maps' resolution: the model's input, or input / tile times the image with tiling."""
    masks, maps = [], []
    for i in scored:
        mask = mask_at(samples[i], predictions.maps[i].shape)
        if mask is not None:
            masks.append(mask)
            maps.append(predictions.maps[i].astype(np.float32))
    if not any(m.any() for m in masks):
        return None
    return metrics.pixel_metrics(masks, maps)


def _print_summary(result: dict, run_dir) -> None:
    table = Table(title=f"validate -> {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for level in ("image", "pixel", "operating_point"):
        for name, value in result.get(level, {}).items():
            table.add_row(f"{level}.{name}", "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    results.print(table)
