"""Checkpoint folders: weights in safetensors (no pickle), the config that rebuilds the model, metadata.

    <run>/checkpoint/
        model.safetensors          every weight, the frozen encoder's included (runs offline)
        config.yaml                the resolved config of the training run
        meta.json                  versions, input size, normalisation, steps, training score statistics
        training_state.safetensors + training_state.json   optimiser and schedule, for trainer.resume
        threshold.json             written by `anom threshold`

Every write goes to a temporary file that is renamed into place, so a killed
process leaves the previous checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

import anomcli

FORMAT = "anomcli-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
THRESHOLD = "threshold.json"
TRAINING_STATE = "training_state.safetensors"
TRAINING_STATE_META = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or inconsistent."""


@dataclass
class Checkpoint:
    path: Path
    model: nn.Module
    config: DictConfig
    meta: dict[str, Any]
    threshold: dict[str, Any] | None = field(default=None)


# --- atomic writes -----------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- save ----------------------------------------------------------------------------

def save_checkpoint(folder: Path, model: nn.Module, config: DictConfig, meta: dict[str, Any]) -> Path:
    """Write weights, config and meta; meta last, since a complete meta.json marks a usable checkpoint."""
    folder = Path(folder)
    atomic_save_tensors(folder / WEIGHTS, model.state_dict(), metadata={"format": FORMAT})
    atomic_write_bytes(folder / CONFIG, OmegaConf.to_yaml(config, resolve=True).encode())
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
                 "anomcli_version": anomcli.__version__, "torch_version": torch.__version__, **meta}
    atomic_write_json(folder / META, full_meta)
    return folder


def save_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Optimiser moments as tensors (safetensors), everything else as JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    atomic_save_tensors(Path(folder) / TRAINING_STATE, tensors)
    atomic_write_json(Path(folder) / TRAINING_STATE_META, {
        "step": step, "param_groups": state["param_groups"], "scalars": scalars,
        "scheduler": scheduler.state_dict()})


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore what save_training_state wrote; returns the step to continue from."""
    folder = Path(folder)
    if not (folder / TRAINING_STATE).is_file() or not (folder / TRAINING_STATE_META).is_file():
        raise CheckpointError(f"{folder} holds no training state to resume from "
                              f"({TRAINING_STATE}, {TRAINING_STATE_META})")
    info = json.loads((folder / TRAINING_STATE_META).read_text())
    tensors = load_file(str(folder / TRAINING_STATE))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    scheduler.load_state_dict(info["scheduler"])
    return int(info["step"])


# --- load ----------------------------------------------------------------------------

def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from config.yaml and fill it from model.safetensors."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist "
                              "(ckpt= takes the <run>/checkpoint folder that `anom train` wrote)")
    missing = [name for name in (WEIGHTS, CONFIG, META) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    meta = read_json(folder / META, "checkpoint metadata")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not an anomcli checkpoint (meta.json format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by anomcli {meta.get('anomcli_version')} "
                              f"(format {meta['format_version']}); this anomcli reads format "
                              f"{FORMAT_VERSION} and older: upgrade anomcli")
    config = OmegaConf.load(folder / CONFIG)
    model = build_model_for_loading(config.model)
    state = load_file(str(folder / WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{folder}: weights do not match config.yaml (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); the folder mixes files of different runs")
    model.to(device).eval()
    threshold = read_json(folder / THRESHOLD, "threshold") if (folder / THRESHOLD).is_file() else None
    return Checkpoint(folder, model, config, meta, threshold)


def build_model_for_loading(model_config: DictConfig) -> nn.Module:
    """Instantiate the architecture only: the weights come from the checkpoint, not the hub."""
    config = OmegaConf.create(OmegaConf.to_container(model_config, resolve=True))
    if "encoder" in config:
        config.encoder.pretrained = False
        config.encoder.weights = None
    try:
        return instantiate(config)
    except Exception as error:  # noqa: BLE001 - any failure means the config cannot rebuild the model
        raise CheckpointError(f"cannot rebuild the model from the checkpoint's config.yaml: {error}") from error
