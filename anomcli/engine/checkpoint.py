"""Checkpoint folders: weights in safetensors (no pickle), the config that rebuilds the model, metadata.

    <run>/checkpoint/
        model.safetensors          every weight, the frozen encoder's included (runs offline)
        config.yaml                the resolved config of the training run
        meta.json                  versions, input size, normalisation, steps, training score statistics
        training_state.safetensors + training_state.json   optimiser, schedule and RNG, for trainer.resume
        threshold.json             written by `anom threshold`

A save writes every file into a staging folder next to the checkpoint and then
swaps the folders, so a killed process leaves either the previous checkpoint or
the new one, complete, never a mix of the two. Only safetensors and plain
text are ever read: no file of a checkpoint can run code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import anomcli

log = logging.getLogger(__name__)

FORMAT = "anomcli-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
THRESHOLD = "threshold.json"
TRAINING_STATE = "training_state.safetensors"
TRAINING_STATE_META = "training_state.json"
_RNG_PREFIX = "rng."  # training-state tensors that hold random generator states, not optimiser moments


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

def _fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` durable; some platforms cannot open folders, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def previous_folder(folder: Path) -> Path:
    """Where the last complete checkpoint waits while a save swaps folders."""
    return folder.parent / f".{folder.name}.previous"


def commit_folder(staging: Path, folder: Path) -> None:
    """Replace `folder` by the complete `staging` folder.

    POSIX cannot rename a folder over a non-empty one, so the old folder steps
    aside first. A kill between the two renames leaves only the previous
    folder, which load_checkpoint reads instead.
    """
    previous = previous_folder(folder)
    if folder.exists():
        if previous.exists():
            shutil.rmtree(previous)  # left by an earlier interrupted save, now superseded
        os.replace(folder, previous)
    os.replace(staging, folder)
    _fsync_folder(folder.parent)
    shutil.rmtree(previous, ignore_errors=True)


# --- save ----------------------------------------------------------------------------

def save_checkpoint(folder: Path, model: nn.Module, config: DictConfig, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> Path:
    """Write weights, config, meta and (with an optimiser) the training state as one unit.

    Files this save does not rewrite (threshold.json, the training state of a save
    without optimiser) are carried over from the folder's previous contents.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        checkpoint_id = uuid.uuid4().hex
        written = {WEIGHTS, CONFIG, META}
        _write_tensors(staging / WEIGHTS, model.state_dict(), {"format": FORMAT, "checkpoint_id": checkpoint_id})
        _write_bytes(staging / CONFIG, OmegaConf.to_yaml(config, resolve=True).encode())
        if optimizer is not None and scheduler is not None:
            _write_training_state(staging, optimizer, scheduler, int(meta["trainer_step"]))
            written |= {TRAINING_STATE, TRAINING_STATE_META}
        identity = {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint_id": checkpoint_id,
                    "anomcli_version": anomcli.__version__, "torch_version": torch.__version__}
        full_meta = {**identity, **meta, **identity}  # this save's identity, even when meta came from a loaded one
        _write_bytes(staging / META, (json.dumps(full_meta, indent=2) + "\n").encode())
        source = folder if folder.is_dir() else previous_folder(folder)
        if source.is_dir():
            if TRAINING_STATE not in written and not _training_state_at(source, int(meta.get("trainer_step", -1))):
                written |= {TRAINING_STATE, TRAINING_STATE_META}  # another step's state would not fit these weights
            for item in source.iterdir():
                if item.is_file() and item.name not in written and not item.name.startswith("."):
                    shutil.copy2(item, staging / item.name)
        _fsync_folder(staging)
        commit_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _training_state_at(folder: Path, step: int) -> bool:
    try:
        return json.loads((folder / TRAINING_STATE_META).read_text()).get("step") == step
    except (OSError, ValueError):
        return False


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Optimiser moments and random generator states as tensors (safetensors), everything else as JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    # dropout noise after a resume continues the same random stream as an uninterrupted run
    tensors[f"{_RNG_PREFIX}cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{_RNG_PREFIX}cuda{index}"] = rng
    _write_tensors(folder / TRAINING_STATE, tensors, {"format": FORMAT})
    _write_bytes(folder / TRAINING_STATE_META, (json.dumps({
        "step": step, "param_groups": state["param_groups"], "scalars": scalars,
        "scheduler": scheduler.state_dict()}, indent=2) + "\n").encode())


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Restore the training state saved with a checkpoint; returns the step to continue from."""
    folder = Path(folder)
    if not (folder / TRAINING_STATE).is_file() or not (folder / TRAINING_STATE_META).is_file():
        raise CheckpointError(f"{folder} holds no training state to resume from "
                              f"({TRAINING_STATE}, {TRAINING_STATE_META}); drop trainer.resume=true to "
                              "fine-tune its weights with a fresh optimiser instead")
    info = read_json(folder / TRAINING_STATE_META, "training state")
    meta = read_json(folder / META, "checkpoint metadata")
    if int(info["step"]) != int(meta.get("trainer_step", -1)):
        raise CheckpointError(f"{folder}: the training state is from step {info['step']} but the weights "
                              f"from step {meta.get('trainer_step')}; the folder mixes files of different saves")
    tensors = _read_safetensors(folder / TRAINING_STATE)
    state: dict[int, dict[str, Any]] = {}
    rng: dict[str, torch.Tensor] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        if key.startswith(_RNG_PREFIX):
            rng[key[len(_RNG_PREFIX):]] = value
            continue
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    scheduler.load_state_dict(info["scheduler"])
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng] \
        if torch.cuda.is_available() else []
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(info["step"])


# --- load ----------------------------------------------------------------------------

def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"cannot read {what} {path}: expected a JSON object")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated copy) is refused unread."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header; the first bytes of a
    # valid file can equal a pickle's, so a pickle is named only when the file is not safetensors
    looks_like_safetensors = len(head) == 9 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") <= path.stat().st_size - 8
    if not looks_like_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise CheckpointError(f"{path} is a pickled PyTorch file, not safetensors; anomcli never loads "
                              "pickles from a checkpoint, since they can run code: use the folder `anom train` wrote")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated: "
                              "copy the checkpoint folder again") from error


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", str(version))
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def _release_series(version: str) -> tuple[int, ...]:
    """Releases that promise compatible checkpoints: same major, or same minor while the major is 0."""
    release = _release(version)
    return release[:2] if release[:1] == (0,) else release[:1]


def check_versions(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse checkpoints this anomcli cannot read; warn about other versions it can."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not an anomcli checkpoint (meta.json format={meta.get('format')!r}); "
                              "ckpt= takes the <run>/checkpoint folder that `anom train` wrote")
    written_by = str(meta.get("anomcli_version", "unknown"))
    try:
        format_version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        format_version = 0
    if format_version > FORMAT_VERSION or _release_series(written_by) > _release_series(anomcli.__version__):
        raise CheckpointError(f"{folder} was written by anomcli {written_by} (checkpoint format "
                              f"{meta.get('format_version')}), newer than this anomcli {anomcli.__version__} "
                              f"(format {FORMAT_VERSION}): upgrade anomcli to {written_by} or later")
    if format_version < 1:
        raise CheckpointError(f"{folder} has checkpoint format {meta.get('format_version')!r}, which this anomcli "
                              f"no longer reads: retrain with anomcli {anomcli.__version__}")
    if written_by != anomcli.__version__:
        log.warning("%s was written by anomcli %s; this is anomcli %s", folder, written_by, anomcli.__version__)


def _complete_folder(folder: Path) -> Path:
    """The folder to read: `folder`, or the complete previous one a killed save left beside it."""
    previous = previous_folder(folder)
    if not folder.is_dir() and (previous / META).is_file():
        log.warning("%s is missing because a save was interrupted; reading the last complete checkpoint %s",
                    folder, previous)
        return previous
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist "
                              "(ckpt= takes the <run>/checkpoint folder that `anom train` wrote)")
    return folder


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from config.yaml and fill it from model.safetensors, checking each step."""
    folder = _complete_folder(Path(folder).expanduser())
    missing = [name for name in (WEIGHTS, CONFIG, META) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)} "
                              "(copy the whole folder that `anom train` wrote)")
    meta = read_json(folder / META, "checkpoint metadata")
    check_versions(folder, meta)
    try:
        config = OmegaConf.load(folder / CONFIG)
    except Exception as error:  # noqa: BLE001 - YAML and OmegaConf raise many kinds
        raise CheckpointError(f"cannot read {folder / CONFIG}: {str(error).splitlines()[0]}") from error
    if not isinstance(config, DictConfig) or "model" not in config or "_target_" not in config.model:
        raise CheckpointError(f"{folder / CONFIG} does not describe a model (no model._target_)")
    kind = str(config.model._target_).rsplit(".", 1)[-1].lower()
    if meta.get("model") and meta["model"] != kind:
        raise CheckpointError(f"{folder}: meta.json is from a {meta['model']} model but config.yaml builds "
                              f"a {kind}; the folder mixes files of different runs")
    state = _read_safetensors(folder / WEIGHTS)
    saved_id = _safetensors_metadata(folder / WEIGHTS).get("checkpoint_id")
    if saved_id and meta.get("checkpoint_id") and saved_id != meta["checkpoint_id"]:
        raise CheckpointError(f"{folder}: {WEIGHTS} and {META} come from different saves; "
                              "copy the whole checkpoint folder of one run")
    model = build_model_for_loading(config.model, folder, meta)
    _check_weights_fit(folder, model, state)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    threshold = read_json(folder / THRESHOLD, "threshold") if (folder / THRESHOLD).is_file() else None
    return Checkpoint(folder, model, config, meta, threshold)


def _check_weights_fit(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    # buffers whose number of rows comes from the training data (PatchCore's memory bank): only the
    # width must match the config
    sized_by_data = set(getattr(model, "data_sized_buffers", ()))

    def fits(key: str, saved: torch.Size, built: torch.Size) -> bool:
        return tuple(saved[1:]) == tuple(built[1:]) if key in sized_by_data else tuple(saved) == tuple(built)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and not fits(k, state[k].shape, v.shape)]
    if missing or unexpected or reshaped:
        details = "; ".join(f"{label} {len(items)}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                            for label, items in (("missing", missing), ("unexpected", unexpected),
                                                 ("other shape (file vs config)", reshaped)) if items)
        raise CheckpointError(f"{folder}: {WEIGHTS} does not fit the model config.yaml describes ({details}); "
                              "the folder mixes files of different runs, or config.yaml was edited: "
                              "copy the whole checkpoint folder of one run")


def build_model_for_loading(model_config: DictConfig, folder: Path | None = None,
                            meta: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the architecture only: the weights come from the checkpoint, not the hub."""
    config = OmegaConf.create(OmegaConf.to_container(model_config, resolve=True))
    if config.get("encoder") is not None:  # models trained from scratch may have none
        config.encoder.pretrained = False
        config.encoder.weights = None
    try:
        return instantiate(config)
    except Exception as error:  # noqa: BLE001 - any failure means the config cannot rebuild the model
        cause = error.__cause__ or error
        written_by = (meta or {}).get("anomcli_version")
        hint = (f"; it was written by anomcli {written_by} and this is {anomcli.__version__}: use that version"
                if written_by and written_by != anomcli.__version__ else
                "; config.yaml may have been edited: copy the checkpoint folder again")
        raise CheckpointError(f"cannot rebuild the model from {folder or 'the checkpoint'}'s config.yaml: "
                              f"{str(cause).splitlines()[0]}{hint}") from error
