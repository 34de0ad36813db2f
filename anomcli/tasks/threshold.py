"""`anom threshold`: choose the operating point on a validation set; writes threshold.json.

Methods: `recall` (labelled defects; exact one-sided bounds on the recall and
FPR reached), `fpr` (good images only; the conformal rule), `f1`, and
`synthetic` (no labelled defects: recall estimated on synthetic defects pasted
into the held-out good images, and labelled an estimate).
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from rich.table import Table

from .. import metrics
from ..data.image_io import ImageReadError, load_image
from ..data.synthetic import synthetic_defects
from ..engine.checkpoint import THRESHOLD, atomic_write_json
from ..engine.evaluate import predict_images
from ..engine.fit import resolve_device
from ..engine.progress import results
from .common import UsageError, output_dir, score_test_split

METHODS = ("recall", "fpr", "f1", "synthetic")


def run(cfg: DictConfig) -> dict:
    run_dir = output_dir(cfg)
    method = _method(cfg)
    checkpoint, datamodule, samples, predictions = score_test_split(cfg, keep_maps=False, description="threshold")
    scored = predictions.scored_indices()
    labels = np.array([samples[i].label for i in scored])
    scores = np.array([predictions.scores[i] for i in scored])

    result = {"method": method, "data_root": str(datamodule.root)}
    if method == "recall":
        if not (labels == 1).any():
            raise UsageError("target_recall needs defective images in the validation set; "
                             "with good images only use target_fpr=<rate>")
        result["target"] = cfg.target_recall
        result["threshold"] = metrics.threshold_for_recall(labels, scores, cfg.target_recall)
    elif method == "synthetic":
        good = scores[labels == 0]
        if good.size == 0:
            raise UsageError("method=synthetic needs good images in the validation set to paste defects into")
        result.update(target=cfg.target_recall, **_synthetic_estimate(cfg, checkpoint.model, samples, scored,
                                                                        labels, good, datamodule.batch_size,
                                                                        datamodule.tiling))
    elif method == "fpr":
        good = scores[labels == 0]
        if good.size == 0:
            raise UsageError("target_fpr needs good images in the validation set")
        try:
            threshold, n, min_alpha = metrics.threshold_for_fpr(good, cfg.target_fpr)
        except ValueError as error:  # too few good images for this target: say how many are needed
            raise UsageError(str(error)) from None
        result.update(target=cfg.target_fpr, threshold=threshold, n_good=n, smallest_target_fpr=min_alpha,
                      rule="conformal: the ceil((n+1)(1-a))-th smallest good score")
    else:
        result["target"] = None
        result["f1"], result["threshold"] = metrics.f1_max(labels, scores)
        if result["threshold"] is None:
            raise UsageError("method=f1 needs both good and defective images in the validation set")
    result["achieved"] = metrics.operating_point(labels, scores, result["threshold"])
    result["bounds"] = metrics.operating_point_bounds(result["achieved"], cfg.confidence)
    atomic_write_json(checkpoint.path / THRESHOLD, result)
    atomic_write_json(run_dir / THRESHOLD, result)
    _print(result, checkpoint.path / THRESHOLD)
    return result


def _method(cfg: DictConfig) -> str:
    method = cfg.method
    if method == "auto":
        method = "fpr" if cfg.target_fpr is not None else "recall"
    if method not in METHODS:
        raise UsageError(f"method must be auto or one of {', '.join(METHODS)}, got {method!r}")
    if method in ("recall", "synthetic") and not 0 < cfg.target_recall <= 1:
        raise UsageError(f"target_recall must be in (0, 1], got {cfg.target_recall}")
    if method == "fpr" and (cfg.target_fpr is None or not 0 < cfg.target_fpr < 1):
        raise UsageError(f"target_fpr must be in (0, 1), got {cfg.target_fpr}")
    if not 0 < cfg.confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {cfg.confidence}")
    return method


def _synthetic_estimate(cfg: DictConfig, model, samples, scored, labels, good_scores, batch_size: int,
                        tiling=None) -> dict:
    """Threshold for target_recall on synthetic defects pasted into the held-out good images."""
    images = []
    for i, label in zip(scored, labels):
        if label == 0:
            try:
                images.append(load_image(samples[i].path))
            except ImageReadError:  # already reported by scoring; nothing to paste into
                continue
    kinds: list[str] = []

    def generate():
        for kind, image in synthetic_defects(images, cfg.synthetic.per_image, seed=cfg.synthetic.seed):
            kinds.append(kind)
            yield image

    synthetic_scores = predict_images(model, generate(), resolve_device(cfg.device), batch_size=batch_size,
                                      total=len(images) * cfg.synthetic.per_image, description="synthetic defects",
                                      tiling=tiling)
    both_labels = np.r_[np.zeros(good_scores.size, dtype=int), np.ones(synthetic_scores.size, dtype=int)]
    both_scores = np.r_[good_scores, synthetic_scores]
    threshold = metrics.threshold_for_recall(both_labels, both_scores, cfg.target_recall)
    estimate = metrics.operating_point(both_labels, both_scores, threshold)
    kinds_array = np.array(kinds)
    return {
        "threshold": threshold,
        "estimate": True,
        "note": (f"recall estimated on {synthetic_scores.size} synthetic defects pasted into {len(images)} "
                 "held-out good images, not measured on real defects"),
        "synthetic": {
            "per_image": cfg.synthetic.per_image, "seed": cfg.synthetic.seed,
            "estimated_recall": estimate["recall"],
            "bounds": metrics.operating_point_bounds(estimate, cfg.confidence),
            "per_kind_recall": {kind: float((synthetic_scores[kinds_array == kind] >= threshold).mean())
                                for kind in sorted(set(kinds))},
        },
    }


def _print(result: dict, path) -> None:
    table = Table(title=f"threshold ({result['method']}) -> {path}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("threshold", f"{result['threshold']:.6f}")
    table.add_row("target", "-" if result["target"] is None else str(result["target"]))
    achieved = result["achieved"]
    for key in ("recall", "fpr", "precision"):
        value = achieved[key]
        table.add_row(key, "-" if value is None else f"{value:.4f}")
    table.add_row("defective caught", f"{achieved['tp']} / {achieved['n_defective']}")
    table.add_row("good flagged", f"{achieved['fp']} / {achieved['n_good']}")
    bounds, level = result["bounds"], f"{result['bounds']['confidence']:.0%}"
    if bounds["recall_lower"] is not None:
        table.add_row(f"recall >= ({level} conf.)", f"{bounds['recall_lower']:.4f}")
    if bounds["fpr_upper"] is not None:
        table.add_row(f"fpr <= ({level} conf.)", f"{bounds['fpr_upper']:.4f}")
    if result["method"] == "fpr":
        table.add_row("good images n", str(result["n_good"]))
        table.add_row("smallest target_fpr n allows", f"{result['smallest_target_fpr']:.4f}")
    if result.get("estimate"):
        synthetic = result["synthetic"]
        table.add_row("ESTIMATED recall (synthetic)", f"{synthetic['estimated_recall']:.4f}")
        table.add_row(f"  >= ({level} conf.)", f"{synthetic['bounds']['recall_lower']:.4f}")
        for kind, recall in synthetic["per_kind_recall"].items():
            table.add_row(f"  {kind}", f"{recall:.4f}")
    results.print(table)
