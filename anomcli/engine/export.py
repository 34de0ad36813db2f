"""ONNX export of a scoring model: images in, anomaly maps and image scores out, any batch size.

The graph holds the whole `predict`: encoder, decoder (or memory-bank search), the
anomaly-map post-processing (cosine distance, upsampling, Gaussian smoothing) and
the image score, so a runtime needs nothing but the resized image batch.

    input   images        float32 [B, 3, S, S], RGB in [0, 1] (resized, not cropped, to S x S)
    outputs anomaly_maps  float32 [B, 1, S, S]
            scores        float32 [B]
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17  # LayerNormalization is a single op from 17 on
INPUT_NAME, OUTPUT_NAMES = "images", ("anomaly_maps", "scores")
# float32 graphs reorder sums (fused attention, einsum, convolution algorithms, distance kernels): maps
# and scores of onnxruntime and torch agree to about 1e-6 on Dinomaly's maps (cosine distances, scale 1)
# and to about 1e-5 relative on PatchCore's (Euclidean distances, scale 10-100). The bound is
# max |onnx - torch| <= PARITY_TOLERANCE * max(1, max |torch|), for maps and scores separately.
PARITY_TOLERANCE = 1e-4


class ExportDependencyError(RuntimeError):
    """onnx / onnxruntime are not installed."""


class ScoringGraph(nn.Module):
    """`model.predict` as a forward, the shape an exporter traces: images -> (maps, scores)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(images)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise ExportDependencyError(f"ONNX export needs {module}: pip install 'anomcli[export]'") from error


def export_onnx(model: nn.Module, path: Path, *, example_batch: int = 2) -> Path:
    """Write `model`'s scoring graph to `path` (atomically), batch dimension dynamic."""
    _require("onnx")
    model = model.cpu().eval()
    side = model.input_size
    example = torch.rand(example_batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    batch = {0: "batch"}
    try:
        with warnings.catch_warnings():
            # the tracer flags every Python int it meets; here they are fixed sizes (input side, bank
            # rows, top-k count), and the parity check covers batch sizes the graph was not traced with
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(ScoringGraph(model), (example,), tmp, input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=OPSET, dynamo=False,
                              dynamic_axes={INPUT_NAME: batch, OUTPUT_NAMES[0]: batch, OUTPUT_NAMES[1]: batch})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def onnx_session(path: Path, options=None):
    ort = _require("onnxruntime")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
    return maps, scores


def parity(model: nn.Module, path: Path, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> dict:
    """Max absolute difference of maps and scores, torch (fp32, CPU) vs onnxruntime, on random batches."""
    session = onnx_session(path)
    model = model.cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    worst = {"map_max_abs_diff": 0.0, "score_max_abs_diff": 0.0, "map_scale": 1.0, "score_scale": 1.0}
    for batch in batch_sizes:
        images = torch.rand(batch, 3, model.input_size, model.input_size, generator=generator)
        with torch.inference_mode():
            maps, scores = (x.numpy() for x in model.predict(images))
        onnx_maps, onnx_scores = run_onnx(session, images.numpy())
        for name, ours, theirs in (("map", maps, onnx_maps), ("score", scores, onnx_scores)):
            worst[f"{name}_max_abs_diff"] = max(worst[f"{name}_max_abs_diff"], float(np.abs(theirs - ours).max()))
            worst[f"{name}_scale"] = max(worst[f"{name}_scale"], float(np.abs(ours).max()))
    worst["batch_sizes"] = list(batch_sizes)
    worst["tolerance"] = PARITY_TOLERANCE
    worst["within_tolerance"] = all(worst[f"{name}_max_abs_diff"] <= PARITY_TOLERANCE * worst[f"{name}_scale"]
                                    for name in ("map", "score"))
    return worst
