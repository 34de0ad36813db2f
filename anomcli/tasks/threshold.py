"""`anom threshold`: choose the operating point on a validation set; writes threshold.json."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from rich.table import Table

from .. import metrics
from ..engine.checkpoint import THRESHOLD, atomic_write_json
from ..engine.progress import results
from .common import UsageError, output_dir, score_test_split

METHODS = ("recall", "fpr", "f1")


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
    elif method == "fpr":
        good = scores[labels == 0]
        if good.size == 0:
            raise UsageError("target_fpr needs good images in the validation set")
        threshold, n, min_alpha = metrics.threshold_for_fpr(good, cfg.target_fpr)
        result.update(target=cfg.target_fpr, threshold=threshold, n_good=n, smallest_target_fpr=min_alpha,
                      rule="conformal: the ceil((n+1)(1-a))-th smallest good score")
    else:
        result["target"] = None
        result["f1"], result["threshold"] = metrics.f1_max(labels, scores)
        if result["threshold"] is None:
            raise UsageError("method=f1 needs both good and defective images in the validation set")
    result["achieved"] = metrics.operating_point(labels, scores, result["threshold"])
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
    if method == "recall" and not 0 < cfg.target_recall <= 1:
        raise UsageError(f"target_recall must be in (0, 1], got {cfg.target_recall}")
    if method == "fpr" and (cfg.target_fpr is None or not 0 < cfg.target_fpr < 1):
        raise UsageError(f"target_fpr must be in (0, 1), got {cfg.target_fpr}")
    return method


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
    results.print(table)
