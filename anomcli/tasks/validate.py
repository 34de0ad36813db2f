"""`anom validate`: score a labelled test split; metrics.json, scores.csv, heatmap overlays, and a
false-positive report (false_positives/) that says, for each flagged good image, how far it lies from
the nearest training image in the encoder's feature space."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.table import Table

from .. import metrics
from ..data.datamodule import DatasetLayoutError
from ..engine.checkpoint import atomic_write_json
from ..engine.evaluate import encoder_embeddings
from ..engine.fit import resolve_device
from ..engine.progress import results
from ..visualize import save_score_histogram
from .common import (heatmap_names, map_scale, mask_at, output_dir, safe_output_path, score_test_split, write_csv,
                     write_heatmap)

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    run_dir = output_dir(cfg)
    checkpoint, datamodule, samples, predictions = score_test_split(cfg, keep_maps=True, description="validate")
    model = checkpoint.model

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

    write_csv(run_dir / "scores.csv", ["path", "defect_type", "label", "score"],
              ([str(samples[i].path), samples[i].defect_type, samples[i].label, f"{predictions.scores[i]:.6f}"]
               for i in scored))
    # test/<defect>/<name>: distinct outputs even for a.png and a.jpg side by side
    names = heatmap_names([sample.path for sample in samples], datamodule.root / "test")
    if cfg.heatmaps != "none":
        scale = map_scale(checkpoint)
        for i in scored:
            flagged = threshold is not None and predictions.scores[i] >= threshold
            if cfg.heatmaps == "all" or flagged or (threshold is None and samples[i].label == 1):
                sample = samples[i]
                write_heatmap(safe_output_path(run_dir / "heatmaps", names[i]),
                              sample, predictions.maps[i], scale, draw_mask=True)
    for index, reason in predictions.errors.items():
        log.warning("could not score %s: %s", samples[index].path, reason)
    if cfg.false_positives.enabled:
        result["false_positives"] = _false_positive_report(cfg, run_dir / "false_positives", checkpoint,
                                                           datamodule, samples, scored, labels, scores,
                                                           predictions, threshold, result["per_defect"], names)
    atomic_write_json(run_dir / "metrics.json", result)
    _print_summary(result, run_dir)
    return result


def _false_positive_report(cfg, folder: Path, checkpoint, datamodule, samples, scored, labels, scores,
                           predictions, threshold, per_defect, names) -> dict:
    """false_positives/: score histogram, and each flagged good image with its heatmap and its
    distance to the nearest training image, against the distances among training images themselves."""
    folder.mkdir(parents=True, exist_ok=True)
    save_score_histogram(folder / "score_histogram.png", scores[labels == 0], scores[labels == 1], threshold)
    summary = {"threshold": threshold, "n_good": int((labels == 0).sum()),
               "recall_per_defect": {k: v["recall"] for k, v in per_defect.items()}, "flagged": []}
    if threshold is None:
        summary["note"] = "no threshold.json in the checkpoint: run `anom threshold` to list false positives"
        atomic_write_json(folder / "report.json", summary)
        return {"flagged": None, "folder": str(folder)}
    flagged = [i for i, label, score in zip(scored, labels, scores) if label == 0 and score >= threshold]
    summary["n_flagged"] = len(flagged)
    if flagged:
        summary.update(_nearest_training_images(cfg, checkpoint, datamodule, samples, flagged))
        scale = map_scale(checkpoint)
        for i, entry in zip(flagged, summary["flagged"]):
            sample = samples[i]
            entry["score"] = predictions.scores[i]
            name = Path(names[i].name)  # flagged images are all good ones: one folder, names distinct
            image_copy = safe_output_path(folder / "images", name.with_suffix(sample.path.suffix))
            shutil.copyfile(sample.path, _make_parent(image_copy))
            write_heatmap(safe_output_path(folder / "heatmaps", name), sample, predictions.maps[i], scale)
        write_csv(folder / "flagged.csv", ["path", "score", "nearest_train_distance", "nearest_train_image",
                                           "unlike_training"],
                  ([e["path"], f"{e['score']:.6f}", _fmt(e["nearest_train_distance"]),
                    e["nearest_train_image"], e["unlike_training"]] for e in summary["flagged"]))
    atomic_write_json(folder / "report.json", summary)
    unlike = sum(e["unlike_training"] for e in summary["flagged"])
    log.info("%d good images flagged (%d unlike every training image); report in %s", len(flagged), unlike, folder)
    return {"flagged": len(flagged), "unlike_training": unlike, "folder": str(folder)}


def _training_data(checkpoint, validation_data):
    """The data the checkpoint was trained on (extra good images included), where it still exists;
    else the training split of the data being validated."""
    trained = checkpoint.config.get("data")
    try:
        if trained is None:
            raise DatasetLayoutError("the checkpoint records no data config")
        training_data = instantiate(trained)
        training_data.prepare()
        return training_data
    except (DatasetLayoutError, FileNotFoundError, FileExistsError, InstantiationException) as error:
        log.warning("comparing flagged images with %s/train/good: the training data is not available (%s)",
                    validation_data.root, error)
        return validation_data


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _make_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _nearest_training_images(cfg, checkpoint, datamodule, samples, flagged) -> dict:
    """Cosine distances in encoder-feature space from each flagged image to its nearest training image.

    The reference is how far each training image lies from its own nearest other training
    image: a flagged image farther than the `unlike_quantile` of those is unlike the training
    set (new conditions: add it as good), one closer is like it (the model is wrong there).
    """
    device = resolve_device(cfg.device)
    model = checkpoint.model
    if getattr(model, "encoder", None) is None:  # trained from scratch (VAE, GANomaly): no frozen features
        return {"flagged": [{"path": str(samples[i].path), "nearest_train_distance": None,
                             "nearest_train_image": "", "unlike_training": False} for i in flagged],
                "distance": "not measured: the model has no frozen pre-trained encoder to compare images in"}
    datamodule = _training_data(checkpoint, datamodule)
    train = datamodule.train_samples()
    train = train[:: max(1, -(-len(train) // cfg.false_positives.max_train_images))]
    train_vectors = encoder_embeddings(model, datamodule.loader(train, model.input_size), device,
                                       description="training features")
    train_index = sorted(train_vectors)
    train_matrix = np.stack([train_vectors[i] for i in train_index])  # [T, D], unit rows
    query_vectors = encoder_embeddings(model, datamodule.loader([samples[i] for i in flagged], model.input_size),
                                       device, description="flagged features")

    among_train = 1.0 - train_matrix @ train_matrix.T  # [T, T] cosine distances
    np.fill_diagonal(among_train, np.inf)
    train_nearest = among_train.min(axis=1) if len(train_index) > 1 else np.zeros(1)
    limit = float(np.quantile(train_nearest, cfg.false_positives.unlike_quantile))
    entries = []
    for position, i in enumerate(flagged):
        vector = query_vectors.get(position)
        if vector is None:
            entries.append({"path": str(samples[i].path), "nearest_train_distance": None,
                            "nearest_train_image": "", "unlike_training": False})
            continue
        distances = 1.0 - train_matrix @ vector
        nearest = int(np.argmin(distances))
        entries.append({"path": str(samples[i].path), "nearest_train_distance": float(distances[nearest]),
                        "nearest_train_image": str(train[train_index[nearest]].path),
                        "unlike_training": bool(distances[nearest] > limit)})
    return {"flagged": entries, "distance": "cosine, encoder taps averaged over tokens",
            "train_root": str(datamodule.root), "train_images_compared": len(train_index),
            "train_nearest_distance": {"median": float(np.median(train_nearest)),
                                       "quantile": cfg.false_positives.unlike_quantile, "at_quantile": limit}}


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
    report = result.get("false_positives")
    if report and report["flagged"] is not None:
        table.add_row("good images flagged", f"{report['flagged']} ({report['unlike_training']} unlike training)")
    results.print(table)
