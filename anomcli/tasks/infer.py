"""`anom infer`: score every image under a folder; predictions.jsonl and heatmap overlays."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from ..data.datamodule import FolderDataModule, Sample
from ..data.image_io import list_images
from ..engine import distributed
from ..engine.checkpoint import load_checkpoint
from ..engine.evaluate import predict
from ..engine.fit import resolve_device
from ..engine.progress import results
from .common import UsageError, map_scale, output_dir, tiling_for, warn_if_random_encoder, write_heatmap

log = logging.getLogger(__name__)
HEATMAP_MODES = ("flagged", "all", "none")


class NothingScoredError(RuntimeError):
    """No input image could be scored."""


def run(cfg: DictConfig) -> dict:
    if cfg.heatmaps not in HEATMAP_MODES:
        raise UsageError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {cfg.heatmaps!r}")
    run_dir = output_dir(cfg)
    device = distributed.local_device(resolve_device(cfg.device))
    checkpoint = load_checkpoint(cfg.ckpt, device)
    warn_if_random_encoder(checkpoint.meta.get("encoder_pretrained", True))
    threshold, threshold_source = _threshold(cfg, checkpoint)
    root, files = _input_files(Path(cfg.input).expanduser())
    # under torchrun each process scores every N-th file and writes its own part of predictions.jsonl
    samples = distributed.shard([Sample(path, -1, "") for path in files])
    scale = map_scale(checkpoint) if cfg.heatmaps != "none" else None
    model = checkpoint.model
    tiling = tiling_for(cfg.data.tiling, checkpoint)
    loader = FolderDataModule(str(root), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              tiling=tiling).loader(samples, model.input_size)

    heatmap_dir = run_dir / "heatmaps"
    counts = {"scored": 0, "flagged": 0, "skipped": 0}
    predictions_path = run_dir / "predictions.jsonl"
    with open(distributed.part_path(predictions_path), "w") as out:
        def write_batch(indices, maps, scores):
            for index, amap, score in zip(indices, maps, scores):
                sample = samples[index]
                flagged = None if threshold is None else bool(score >= threshold)
                heatmap = None
                if cfg.heatmaps == "all" or (cfg.heatmaps == "flagged" and flagged):
                    heatmap = heatmap_dir / _relative(sample.path, root).with_suffix(".png")
                    write_heatmap(heatmap, sample, amap, scale)
                record = {"path": str(sample.path), "score": float(score), "is_anomalous": flagged,
                          "threshold": threshold, "heatmap": str(heatmap) if heatmap else None}
                out.write(json.dumps(record) + "\n")
                counts["scored"] += 1
                counts["flagged"] += int(bool(flagged))
            out.flush()

        predictions = predict(model, loader, device, keep_maps=False, on_batch=write_batch, description="infer")
        for index, reason in sorted(predictions.errors.items()):
            out.write(json.dumps({"path": str(samples[index].path), "score": None, "is_anomalous": None,
                                  "threshold": threshold, "error": reason}) + "\n")
            log.warning("skipped %s: %s", samples[index].path, reason)
            counts["skipped"] += 1

    if distributed.world_size() > 1:
        distributed.merge_jsonl_parts(predictions_path, [str(path) for path in files])
        counts = distributed.sum_over_processes(counts)
    summary = {**counts, "images": len(files), "threshold": threshold, "threshold_source": threshold_source,
               "predictions": str(predictions_path), "tiling": tiling}
    if distributed.is_main_process():
        _print(summary)
    if counts["scored"] == 0:
        raise NothingScoredError(f"none of the {len(files)} input files could be scored "
                                 f"(reasons in {predictions_path})")
    return summary


def _threshold(cfg: DictConfig, checkpoint) -> tuple[float | None, str]:
    if cfg.threshold is not None:
        return float(cfg.threshold), "command line (threshold=...)"
    if checkpoint.threshold is not None:
        return float(checkpoint.threshold["threshold"]), str(checkpoint.path / "threshold.json")
    log.warning("the checkpoint has no threshold.json: writing scores only, nothing is flagged "
                "(run `anom threshold ckpt=...` or pass threshold=<value>)")
    return None, "none"


def _input_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise UsageError(f"input {path} is neither an image file nor a folder")
    files = list_images(path, recursive=True)
    if not files:
        raise UsageError(f"no image files under {path}")
    return path, files


def _relative(path: Path, root: Path) -> Path:
    """The path under the input root, so same-named files in sub-folders keep distinct outputs."""
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def _print(summary: dict) -> None:
    table = Table(title="infer")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("images", "scored", "flagged", "skipped", "threshold", "threshold_source", "predictions"):
        value = summary[key]
        table.add_row(key, "none (scores only)" if key == "threshold" and value is None else str(value))
    results.print(table)
