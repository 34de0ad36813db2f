"""ONNX export: the graph scores like the PyTorch model, for any batch size, from the command line too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomcli.engine.export import PARITY_TOLERANCE, export_onnx, onnx_session, parity, run_onnx
from anomcli.tasks import train

from .helpers import run_cli
from .test_inference import tiny_cnn_dinomaly, tiny_patchcore, tiny_vit_dinomaly

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("build", [tiny_vit_dinomaly, tiny_cnn_dinomaly, tiny_patchcore],
                         ids=["dinomaly-vit", "dinomaly-cnn", "patchcore"])
def test_onnx_maps_and_scores_match_torch_within_tolerance(build, tmp_path):
    model = build()
    path = export_onnx(model, tmp_path / "model.onnx", example_batch=2)
    check = parity(model, path, batch_sizes=(1, 3))  # neither is the batch size it was traced with
    assert check["within_tolerance"], check
    assert check["map_max_abs_diff"] <= PARITY_TOLERANCE * check["map_scale"]
    assert check["score_max_abs_diff"] <= PARITY_TOLERANCE * check["score_scale"]


def test_onnx_outputs_have_the_documented_shapes_for_any_batch(tmp_path):
    model = tiny_vit_dinomaly()
    session = onnx_session(export_onnx(model, tmp_path / "model.onnx"))
    for batch in (1, 5):
        maps, scores = run_onnx(session, np.random.default_rng(0).random((batch, 3, 56, 56)))
        assert maps.shape == (batch, 1, 56, 56) and scores.shape == (batch,)
        assert maps.dtype == np.float32 and np.isfinite(maps).all()


def test_export_leaves_no_partial_file_when_it_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(tiny_vit_dinomaly(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_anom_export_writes_the_graph_and_its_description(train_cfg, tmp_path):
    checkpoint = train.run(train_cfg)["checkpoint"]
    run_cli("export", f"ckpt={checkpoint}", "format=onnx", f"hydra.run.dir={tmp_path / 'e'}")
    description = json.loads((tmp_path / "e" / "model.json").read_text())
    assert (tmp_path / "e" / "model.onnx").is_file()
    assert description["input_size"] == 56 and description["parity"]["within_tolerance"]
    assert set(description["outputs"]) == {"anomaly_maps", "scores"}

    wrong = run_cli("export", f"ckpt={checkpoint}", "format=tensorrt", f"hydra.run.dir={tmp_path / 'w'}",
                    check=False)
    assert wrong.returncode == 2 and "format must be one of onnx" in wrong.stderr
