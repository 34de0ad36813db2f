"""`anom infer`: score every image under a folder; predictions.jsonl and heatmap overlays.

Each scored file is appended to predictions.jsonl as soon as its batch is done,
so a killed run loses at most one batch; `resume=true` in the same run folder
keeps what was scored and scores only the rest.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from ..data.datamodule import FolderDataModule, Sample
from ..data.image_io import IMAGE_EXTENSIONS, list_images
from ..engine import distributed
from ..engine.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, read_json
from ..engine.evaluate import predict
from ..engine.fit import resolve_device
from ..engine.progress import results
from .common import (UsageError, heatmap_names, map_scale, output_dir, safe_output_path, tiling_for,
                     warn_if_random_encoder, write_heatmap)

log = logging.getLogger(__name__)
HEATMAP_MODES = ("flagged", "all", "none")
PREDICTIONS = "predictions.jsonl"
RUN_RECORD = "infer_run.json"  # what a resumed run must match: checkpoint and threshold
SKIPPED_SHOWN = 20  # skipped files listed in the summary table; all are in predictions.jsonl


class NothingScoredError(RuntimeError):
    """No input image could be scored."""


def run(cfg: DictConfig) -> dict:
    if cfg.heatmaps not in HEATMAP_MODES:
        raise UsageError(f"heatmaps must be one of {', '.join(HEATMAP_MODES)}, got {cfg.heatmaps!r}")
    root, files = _input_files(Path(str(cfg.input)).expanduser())
    run_dir = output_dir(cfg)
    device = distributed.local_device(resolve_device(cfg.device))
    checkpoint = load_checkpoint(cfg.ckpt, device)
    warn_if_random_encoder(checkpoint.meta.get("encoder_pretrained", True))
    threshold, threshold_source = _threshold(cfg, checkpoint)
    run_record = {"checkpoint": str(checkpoint.path.resolve()), "checkpoint_id": checkpoint.meta.get("checkpoint_id"),
                  "threshold": threshold}
    done = _previous_predictions(run_dir, run_record) if cfg.get("resume", False) else {}
    distributed.barrier()  # every process has read what a previous run left before rank 0 rewrites it
    if distributed.is_main_process():
        atomic_write_json(run_dir / RUN_RECORD, run_record)

    heatmap_dir = run_dir / "heatmaps"
    names = heatmap_names(files, root)
    pending = [(path, name) for path, name in zip(files, names) if str(path) not in done]
    # under torchrun each process scores every N-th pending file into its own part of predictions.jsonl,
    # rank 0's part starting with the kept lines; the parts are merged into one file at the end
    pending = distributed.shard(pending)
    if not distributed.is_main_process():
        done = {}
    samples = [Sample(path, -1, "") for path, _ in pending]
    scale = map_scale(checkpoint) if cfg.heatmaps != "none" and samples else None
    model = checkpoint.model
    tiling = tiling_for(cfg.data.tiling, checkpoint)
    counts = {"scored": len(done), "flagged": sum(bool(r.get("is_anomalous")) for r in done.values()),
              "skipped": 0, "already_scored": len(done)}
    skipped: list[tuple[str, str]] = []
    predictions_path = distributed.part_path(run_dir / PREDICTIONS)
    # resume rewrites the kept lines first, so a line cut by the kill never survives
    atomic_write_bytes(predictions_path, "".join(json.dumps(r) + "\n" for r in done.values()).encode())
    with open(predictions_path, "a", encoding="utf-8") as out:
        def write_batch(indices, maps, scores):
            for index, amap, score in zip(indices, maps, scores):
                sample = samples[index]
                flagged = None if threshold is None else bool(score >= threshold)
                heatmap = None
                if cfg.heatmaps == "all" or (cfg.heatmaps == "flagged" and flagged):
                    heatmap = safe_output_path(heatmap_dir, pending[index][1])
                    write_heatmap(heatmap, sample, amap, scale)
                record = {"path": str(sample.path), "score": float(score), "is_anomalous": flagged,
                          "threshold": threshold, "heatmap": str(heatmap) if heatmap else None}
                out.write(json.dumps(record) + "\n")
                counts["scored"] += 1
                counts["flagged"] += int(bool(flagged))
            out.flush()
            os.fsync(out.fileno())

        if samples:
            loader = FolderDataModule(str(root), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                      tiling=tiling).loader(samples, model.input_size)
            predictions = predict(model, loader, device, keep_maps=False, on_batch=write_batch,
                                  description="infer", precision=cfg.precision, compile_model=cfg.compile)
            for index, reason in sorted(predictions.errors.items()):
                out.write(json.dumps({"path": str(samples[index].path), "score": None, "is_anomalous": None,
                                      "threshold": threshold, "heatmap": None, "error": reason}) + "\n")
                log.warning("skipped %s: %s", printable(samples[index].path), printable(reason))
                skipped.append((str(samples[index].path), reason))
            counts["skipped"] = len(skipped)

    if distributed.world_size() > 1:
        distributed.merge_jsonl_parts(run_dir / PREDICTIONS, [str(path) for path in files])
        counts = distributed.sum_over_processes({**counts, "skipped_files": skipped})
        skipped = counts.pop("skipped_files")
    summary = {**counts, "images": len(files), "threshold": threshold, "threshold_source": threshold_source,
               "predictions": str(run_dir / PREDICTIONS), "tiling": tiling,
               "skipped_files": [{"path": path, "error": reason} for path, reason in skipped]}
    if distributed.is_main_process():
        _print(summary)
    if counts["scored"] == 0:
        raise NothingScoredError(f"none of the {len(files)} input files could be scored "
                                 f"(reasons in {run_dir / PREDICTIONS})")
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
        raise NothingScoredError(f"no image files under {path} (looked for "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))}, in any case, hidden files skipped)")
    return path, files


def _previous_predictions(run_dir: Path, run_record: dict) -> dict[str, dict]:
    """Scored lines of an earlier run in this folder, by path; unreadable files are tried again."""
    predictions = run_dir / PREDICTIONS
    if not predictions.is_file():
        log.info("resume=true but %s has no %s yet: scoring everything", run_dir, PREDICTIONS)
        return {}
    if not (run_dir / RUN_RECORD).is_file():
        raise UsageError(f"resume=true but {run_dir} has no {RUN_RECORD}: it is not an `anom infer` run folder "
                         "(point hydra.run.dir at the run to continue)")
    earlier = read_json(run_dir / RUN_RECORD, "infer run record")
    for key, what in (("checkpoint_id", "checkpoint"), ("threshold", "threshold")):
        if earlier.get(key) != run_record[key]:
            raise UsageError(f"resume=true but {run_dir} was scored with another {what} "
                             f"({earlier.get(key)!r}, now {run_record[key]!r}): resume with the same ckpt= and "
                             "threshold=, or start a new run folder")
    done = {}
    with open(predictions, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line the kill cut short: that file is scored again
            if isinstance(record, dict) and record.get("score") is not None and "path" in record:
                done[record["path"]] = record
    log.info("resuming: %d files already scored in %s", len(done), predictions)
    return done


def printable(text) -> str:
    """A file name for the terminal and the log: bytes that are not UTF-8 (names from old file
    shares) become U+FFFD instead of failing the write. predictions.jsonl keeps the exact name."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print(summary: dict) -> None:
    table = Table(title="infer")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("images", "scored", "already_scored", "flagged", "skipped", "threshold", "threshold_source",
                "predictions"):
        value = summary[key]
        if key == "already_scored" and not value:
            continue
        table.add_row(key, "none (scores only)" if key == "threshold" and value is None else str(value))
    results.print(table)
    if summary["skipped_files"]:
        skipped = Table(title=f"skipped ({len(summary['skipped_files'])})")
        skipped.add_column("file")
        skipped.add_column("reason")
        for item in summary["skipped_files"][:SKIPPED_SHOWN]:
            skipped.add_row(printable(item["path"]), printable(item["error"]))
        if len(summary["skipped_files"]) > SKIPPED_SHOWN:
            skipped.add_row(f"... and {len(summary['skipped_files']) - SKIPPED_SHOWN} more", f"see {PREDICTIONS}")
        results.print(skipped)
