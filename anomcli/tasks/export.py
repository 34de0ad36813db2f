"""`anom export`: the checkpoint's scoring model as an ONNX graph, checked against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.table import Table

from ..engine.checkpoint import atomic_write_json, load_checkpoint
from ..engine.export import OPSET, PARITY_TOLERANCE, export_onnx, parity
from ..engine.progress import results
from .common import UsageError, output_dir, warn_if_random_encoder

log = logging.getLogger(__name__)
FORMATS = ("onnx",)


class ExportMismatchError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's by more than the stated tolerance."""


def run(cfg: DictConfig) -> dict:
    if cfg.format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    run_dir = output_dir(cfg)
    checkpoint = load_checkpoint(cfg.ckpt, torch.device("cpu"))
    warn_if_random_encoder(checkpoint.meta.get("encoder_pretrained", True))
    model = checkpoint.model
    path = Path(cfg.output).expanduser() if cfg.output else run_dir / "model.onnx"
    export_onnx(model, path)
    summary = {"format": cfg.format, "model": str(path), "opset": OPSET, "input_size": model.input_size,
               "inputs": {"images": "float32 [batch, 3, S, S], RGB in [0, 1], resized (not cropped) to S x S"},
               "outputs": {"anomaly_maps": "float32 [batch, 1, S, S]", "scores": "float32 [batch]"},
               "threshold": checkpoint.threshold["threshold"] if checkpoint.threshold else None,
               "map_scale": checkpoint.meta.get("train_statistics", {}).get("map_scale"),
               "checkpoint": str(checkpoint.path)}
    if cfg.verify:
        summary["parity"] = parity(model, path)
    atomic_write_json(path.with_suffix(".json"), summary)
    _print(summary)
    if cfg.verify and not summary["parity"]["within_tolerance"]:
        raise ExportMismatchError(f"ONNX outputs differ from PyTorch by more than {PARITY_TOLERANCE}: "
                                  f"{summary['parity']}")
    return summary


def _print(summary: dict) -> None:
    table = Table(title="export")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("format", "model", "opset", "input_size", "threshold"):
        table.add_row(key, str(summary[key]))
    if "parity" in summary:
        check = summary["parity"]
        table.add_row("max |map diff| vs torch", f"{check['map_max_abs_diff']:.2e}")
        table.add_row("max |score diff| vs torch", f"{check['score_max_abs_diff']:.2e}")
    results.print(table)
