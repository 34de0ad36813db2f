"""scripts/bench_speed.py --quick: the smoke run CI can afford, and its JSON lines other tools read."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import REPO

FIELDS = {"impl", "model", "encoder", "input_size", "batch", "images_per_s", "ms_per_image", "precision",
          "mode", "gflops_per_image", "peak_gflops", "fraction_of_peak"}


def bench(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_speed.py"), "--quick", "--json", *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is one JSON object


def test_model_only_json_rows():
    rows = bench("--model-only", "--batches", "1", "2", "--precisions", "fp32")
    expected = [("dinomaly_tiny", 1), ("dinomaly_tiny", 2), ("patchcore_tiny", 1), ("patchcore_tiny", 2)]
    assert [(r["model"], r["batch"]) for r in rows if r["impl"] == "anomcli"] == expected
    assert [(r["model"], r["batch"]) for r in rows if r["impl"] == "anomcli-onnxruntime"] == expected
    for row in rows:
        assert FIELDS <= row.keys() and row["mode"] == "model"
        # no upper bound on the share of peak: on a busy machine the peak measured first can come out low
        assert row["images_per_s"] > 0 and row["gflops_per_image"] > 0 and row["fraction_of_peak"] > 0
        assert abs(row["ms_per_image"] - 1000 / row["images_per_s"]) < 0.01 * row["ms_per_image"] + 0.01


def test_end_to_end_rows_run_anom_infer():
    rows = bench("--models", "dinomaly_tiny", "--batches", "2", "--precisions", "fp32", "--workers", "0", "--no-onnx")
    assert [r["mode"] for r in rows] == ["model", "end_to_end"]
    assert rows[1]["images_per_s"] > 0 and rows[1]["input_size"] == 56


def test_int8_rows_use_the_int8_matmul_peak():
    rows = bench("--model-only", "--models", "dinomaly_tiny", "--batches", "1", "--precisions", "int8", "--no-onnx")
    assert [(r["impl"], r["precision"]) for r in rows] == [("anomcli", "int8")]
    assert rows[0]["images_per_s"] > 0 and rows[0]["peak_gflops"] > 0


def test_profile_goes_to_stderr_and_keeps_stdout_json():
    command = [sys.executable, str(REPO / "scripts" / "bench_speed.py"), "--quick", "--json", "--model-only",
               "--models", "dinomaly_tiny", "--batches", "1", "--precisions", "fp32", "--no-onnx", "--profile"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dinomaly_tiny, batch 1, fp32: one predict call by operator" in result.stderr
    assert "aten::" in result.stderr  # the operator table
    assert [json.loads(line)["model"] for line in result.stdout.splitlines()] == ["dinomaly_tiny"]
