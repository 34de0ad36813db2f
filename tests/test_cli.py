"""End to end through the real CLI (subprocess): train, validate, threshold, infer, sweeps, exit codes."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from .helpers import run_cli, tiny_data_overrides

TRAIN = ["model/encoder=tiny", "trainer.max_steps=8", "trainer.warmup_steps=2", "trainer.save_every=4",
         "trainer.stats_images=8", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def trained(tiny_coils, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "train"
    run_cli("train", *TRAIN, *tiny_data_overrides(tiny_coils), f"hydra.run.dir={run_dir}")
    return run_dir / "checkpoint"


def test_train_writes_checkpoint_and_composed_config(trained):
    assert {p.name for p in trained.iterdir()} >= {"model.safetensors", "config.yaml", "meta.json"}
    assert (trained.parent / ".hydra" / "config.yaml").is_file()
    assert json.loads((trained / "meta.json").read_text())["trainer_step"] == 8


def test_validate_threshold_validate_infer(trained, tiny_coils, tmp_path):
    # validate alone uses the checkpoint's own data (its test split)
    run_cli("validate", f"ckpt={trained}", f"hydra.run.dir={tmp_path / 'v1'}")
    metrics = json.loads((tmp_path / "v1" / "metrics.json").read_text())
    assert set(metrics["image"]) == {"auroc", "ap", "f1_max", "fpr_at_95_recall"}
    assert set(metrics["pixel"]) == {"auroc", "ap", "f1_max", "aupro"}
    assert metrics["counts"]["good"] == 6 and metrics["counts"]["defective"] == 12
    assert set(metrics["per_defect"]) == {"scratch", "dent", "pit", "stain", "roll_mark", "edge_crack"}
    assert all(v["count"] == 2 for v in metrics["per_defect"].values())
    assert "operating_point" not in metrics
    with open(tmp_path / "v1" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and set(rows[0]) == {"path", "defect_type", "label", "score"}
    heatmap = tmp_path / "v1" / "heatmaps" / "scratch" / "000.png"
    assert Image.open(heatmap).size == (96, 64)  # the original image size, not the model's 56 px

    out = run_cli("threshold", f"ckpt={trained}", "target_recall=0.9", f"hydra.run.dir={tmp_path / 't'}")
    threshold = json.loads((trained / "threshold.json").read_text())
    assert threshold["method"] == "recall" and threshold["target"] == 0.9
    assert threshold["achieved"]["recall"] >= 0.9
    assert "threshold" in out.stdout + out.stderr

    run_cli("validate", f"ckpt={trained}", f"hydra.run.dir={tmp_path / 'v2'}")
    metrics = json.loads((tmp_path / "v2" / "metrics.json").read_text())
    assert metrics["operating_point"]["threshold"] == pytest.approx(threshold["threshold"])
    assert metrics["operating_point"]["recall"] >= 0.9
    assert all(v["recall"] is not None for v in metrics["per_defect"].values())

    run_cli("infer", f"ckpt={trained}", f"input={tiny_coils / 'test'}", "heatmaps=all",
            f"hydra.run.dir={tmp_path / 'i'}")
    lines = [json.loads(line) for line in (tmp_path / "i" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 18
    assert all(line["threshold"] == pytest.approx(threshold["threshold"]) for line in lines)
    assert all(line["is_anomalous"] == (line["score"] >= line["threshold"]) for line in lines)
    # same file names in different sub-folders keep separate heatmaps
    assert (tmp_path / "i" / "heatmaps" / "dent" / "000.png").is_file()
    assert (tmp_path / "i" / "heatmaps" / "good" / "000.png").is_file()


def test_infer_threshold_override_and_unreadable_files(trained, tiny_coils, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(tiny_coils / "test" / "good", folder / "a")
    (folder / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((30, 200), 40000, dtype=np.uint16)).save(folder / "wide16bit.png")
    run_cli("infer", f"ckpt={trained}", f"input={folder}", "threshold=-1", "heatmaps=none",
            f"hydra.run.dir={tmp_path / 'i'}")
    lines = [json.loads(line) for line in (tmp_path / "i" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    broken = [line for line in lines if line["path"].endswith("broken.png")][0]
    assert broken["score"] is None and "not an image" in broken["error"]
    scored = [line for line in lines if line["score"] is not None]
    assert len(scored) == 7 and all(line["is_anomalous"] and line["threshold"] == -1 for line in scored)
    assert not (tmp_path / "i" / "heatmaps").exists()


def test_infer_without_threshold_writes_scores_only(tiny_coils, tmp_path):
    run_dir = tmp_path / "train"
    run_cli("train", *TRAIN, "trainer.max_steps=2", *tiny_data_overrides(tiny_coils), f"hydra.run.dir={run_dir}")
    run_cli("infer", f"ckpt={run_dir / 'checkpoint'}", f"input={tiny_coils / 'test' / 'good'}",
            f"hydra.run.dir={tmp_path / 'i'}")
    lines = [json.loads(line) for line in (tmp_path / "i" / "predictions.jsonl").read_text().splitlines()]
    assert lines and all(line["is_anomalous"] is None and line["threshold"] is None for line in lines)


def test_infer_exits_3_when_nothing_could_be_scored(trained, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    result = run_cli("infer", f"ckpt={trained}", f"input={tmp_path / 'in'}", f"hydra.run.dir={tmp_path / 'i'}",
                     check=False)
    assert result.returncode == 3
    assert "empty file" in (tmp_path / "i" / "predictions.jsonl").read_text()


def test_multirun_sweeps_a_parameter(tiny_coils, tmp_path):
    run_cli("train", "--multirun", *TRAIN, "trainer.max_steps=2", "model.bottleneck.dropout=0.2,0.3",
            *tiny_data_overrides(tiny_coils), f"hydra.sweep.dir={tmp_path / 'sweep'}")
    dropouts = sorted(
        json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "sweep" / str(i) / "checkpoint" /
                                                             "config.yaml").read_text())))["model"]["bottleneck"]["dropout"]
        for i in (0, 1))
    assert dropouts == [0.2, 0.3]


def test_help_unknown_subcommand_and_usage_errors(tmp_path):
    help_text = run_cli("--help").stdout
    assert all(task in help_text for task in ("train", "validate", "threshold", "infer"))
    unknown = run_cli("tarin", check=False)
    assert unknown.returncode == 2 and "train" in unknown.stderr
    typo = run_cli("train", "trainer.max_stepz=3", check=False)
    assert typo.returncode == 2 and "max_steps" in typo.stderr
    cfg = run_cli("validate", "ckpt=x", "--cfg", "job").stdout
    assert "ckpt: x" in cfg


def test_missing_checkpoint_fails_with_a_message(tmp_path):
    result = run_cli("validate", f"ckpt={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'v'}", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_bad_data_root_fails_with_a_message(tmp_path):
    result = run_cli("train", "model/encoder=tiny", "data=folder", f"data.root={tmp_path}",
                     f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert result.returncode == 1 and "train/good" in result.stderr


def test_missing_encoder_weights_fail_with_the_three_ways(tmp_path):
    result = run_cli("train", f"hydra.run.dir={tmp_path / 'r'}", f"data.root={tmp_path / 'coils'}",
                     "data.n_train=2", "data.n_test_good=1", "data.n_test_per_defect=1", "data.height=32",
                     "data.width=32", "model.encoder.input_size=56", check=False)
    assert result.returncode == 1
    assert "model.encoder.weights=" in result.stderr and "Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_data_root_override(trained, tiny_coils, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_coils, other)
    for defect in ("scratch", "dent"):
        shutil.rmtree(other / "test" / defect)
    run_cli("validate", f"ckpt={trained}", f"data.root={other}", "heatmaps=none", f"hydra.run.dir={tmp_path / 'v'}")
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics["counts"]["defective"] == 8 and "scratch" not in metrics["per_defect"]
