"""Fast scoring changes nothing it should not: the engine's predict against the plain model."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from anomcli.data.datamodule import ImageDataset, Sample, collate
from anomcli.engine.evaluate import InferenceSettingsError, predict, resolve_precision
from anomcli.model import Dinomaly
from anomcli.model.bottleneck import NoisyMLP
from anomcli.model.decoder import TransformerDecoder
from anomcli.model.encoder import CNNEncoder, ViTEncoder
from anomcli.model.patchcore import PatchCore

from .test_model import TINY_VIT

CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: the networks' outputs move by about 2**-8 relative,
# and the anomaly maps and scores (computed in float32 from them) by a few per cent at most
# int8 weights and per-batch int8 activations: measured under 0.3 % on these tiny models
RELATIVE_TOLERANCE = {"bf16": 0.05, "int8": 0.02}


def tiny_vit_dinomaly() -> Dinomaly:
    torch.manual_seed(0)
    return Dinomaly(ViTEncoder(**TINY_VIT), partial(NoisyMLP), partial(TransformerDecoder, depth=8)).eval()


def tiny_cnn_dinomaly(grid_stride: int = 8) -> Dinomaly:
    torch.manual_seed(0)
    encoder = CNNEncoder("tf_efficientnet_lite0", taps=[3, 4, 5, 6, 7, 8, 9, 10], input_size=64,
                         grid_stride=grid_stride, num_heads=4, pretrained=False)
    return Dinomaly(encoder, partial(NoisyMLP), partial(TransformerDecoder, depth=8)).eval()


def tiny_patchcore() -> PatchCore:
    torch.manual_seed(0)
    encoder = CNNEncoder("tf_efficientnet_lite0", taps=[4, 10], input_size=64, grid_stride=8, pretrained=False)
    model = PatchCore(encoder, coreset_ratio=0.5).eval()
    model.fit([torch.rand(4, 3, 64, 64)])
    return model


@pytest.fixture(scope="module")
def coil_loader(tiny_coils):
    def make(input_size: int) -> DataLoader:
        samples = [Sample(p, -1, "") for p in sorted((tiny_coils / "test").rglob("*.png"))][:6]
        return DataLoader(ImageDataset(samples, input_size), batch_size=4, collate_fn=collate)
    return make


def plain_scores(model, loader) -> tuple[np.ndarray, np.ndarray]:
    """The model's own predict, in the default memory format, without the engine's settings."""
    maps, scores = [], []
    for batch in loader:
        m, s = model.predict(batch["images"])
        maps.append(m[:, 0].numpy())
        scores.append(s.numpy())
    return np.concatenate(maps), np.concatenate(scores)


def engine_scores(model, loader, **settings) -> tuple[np.ndarray, np.ndarray]:
    result = predict(model, loader, CPU, **settings)
    indices = result.scored_indices()
    return (np.stack([result.maps[i].astype(np.float32) for i in indices]),
            np.array([result.scores[i] for i in indices]))


@pytest.mark.parametrize("build", [tiny_vit_dinomaly, tiny_cnn_dinomaly, tiny_patchcore],
                         ids=["dinomaly-vit", "dinomaly-cnn", "patchcore"])
def test_fp32_engine_matches_the_plain_model(build, coil_loader):
    model = build()
    loader = coil_loader(model.input_size)
    expected_maps, expected_scores = plain_scores(model, loader)
    maps, scores = engine_scores(model, loader, precision="fp32")  # inference mode, channels-last CNNs
    # channels-last convolutions add in another order: a few float32 rounding steps
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-5)
    # the engine keeps maps as float16: compare at that precision
    np.testing.assert_allclose(maps, expected_maps.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-5)


def test_cnn_encoder_runs_channels_last_with_unchanged_taps():
    model = tiny_cnn_dinomaly()
    images = torch.rand(2, 3, 64, 64)
    expected = model.encode(images)
    model.to(memory_format=torch.channels_last)
    taps = model.encode(images.contiguous(memory_format=torch.channels_last))
    assert model.encoder.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    # channels-last convolutions sum in another order: float32 rounding, within 1e-5 of each tap's scale
    for tap, reference in zip(taps, expected):
        assert (tap - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("precision, build", [
    ("bf16", tiny_vit_dinomaly), ("bf16", tiny_patchcore), ("bf16", partial(tiny_cnn_dinomaly, grid_stride=16)),
    ("int8", tiny_vit_dinomaly), ("int8", tiny_cnn_dinomaly)],
    # the CNN at stride 16 averages its stride-8 blocks down to the grid (antialiased resampling)
    ids=["bf16-dinomaly-vit", "bf16-patchcore", "bf16-dinomaly-cnn", "int8-dinomaly-vit", "int8-dinomaly-cnn"])
def test_reduced_precision_stays_within_its_stated_tolerance(precision, build, coil_loader):
    model = build()
    loader = coil_loader(model.input_size)
    _, expected_scores = plain_scores(model, loader)
    maps, scores = engine_scores(model, loader, precision=precision)
    assert maps.dtype == np.float32 and np.isfinite(maps).all()
    np.testing.assert_allclose(scores, expected_scores, rtol=RELATIVE_TOLERANCE[precision])
    assert not np.allclose(scores, expected_scores, rtol=0, atol=1e-6)  # the reduced-precision path ran
    if precision == "int8":  # scored by a quantised copy: the model itself keeps its float linear layers
        assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_map_and_score_are_float32_under_autocast():
    model = tiny_vit_dinomaly()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps, scores = model.predict(torch.rand(2, 3, 56, 56))
    assert maps.dtype == torch.float32 and scores.dtype == torch.float32


def test_precision_choices():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(InferenceSettingsError, match="CUDA"):
        resolve_precision("fp16", CPU)
    assert resolve_precision("int8", CPU) == "int8"
    with pytest.raises(InferenceSettingsError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(InferenceSettingsError, match="fp32"):
        resolve_precision("int4", CPU)


def test_infer_precision_from_the_command_line(train_cfg, tiny_coils, tmp_path):
    from anomcli.tasks import train

    from .helpers import run_cli

    checkpoint = train.run(train_cfg)["checkpoint"]
    scores = {}
    for precision in ("fp32", "bf16"):
        run_cli("infer", f"ckpt={checkpoint}", f"input={tiny_coils / 'test'}", "heatmaps=none",
                f"precision={precision}", "device=cpu", "num_workers=0", f"hydra.run.dir={tmp_path / precision}")
        lines = (tmp_path / precision / "predictions.jsonl").read_text().splitlines()
        scores[precision] = {r["path"]: r["score"] for r in map(json.loads, lines)}
    assert scores["fp32"].keys() == scores["bf16"].keys()
    for path, score in scores["fp32"].items():
        assert scores["bf16"][path] == pytest.approx(score, rel=RELATIVE_TOLERANCE["bf16"])

    on_cpu = run_cli("infer", f"ckpt={checkpoint}", f"input={tiny_coils / 'test'}", "precision=fp16",
                     "device=cpu", f"hydra.run.dir={tmp_path / 'fp16'}", check=False)
    assert on_cpu.returncode == 2 and "fp16 needs a CUDA device" in on_cpu.stderr
