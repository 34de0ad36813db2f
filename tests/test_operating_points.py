"""Operating points: Clopper-Pearson bounds, synthetic defects, method=synthetic, the false-positive
report of validate, and training on extra confirmed-good images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from omegaconf import open_dict
from PIL import Image
from scipy.optimize import brentq

from anomcli.data.datamodule import DatasetLayoutError, FolderDataModule
from anomcli.data.synthetic import CUT_PASTE, SYNTHETIC_KINDS, cut_paste, paste_coil_defect, synthetic_defects
from anomcli.engine.checkpoint import load_checkpoint
from anomcli.metrics import clopper_pearson_lower, clopper_pearson_upper, operating_point, operating_point_bounds
from anomcli.tasks import threshold, train, validate
from anomcli.visualize import HISTOGRAM_THRESHOLD_COLOR, save_score_histogram

from .helpers import compose_task, tiny_data_overrides

# --- Clopper-Pearson ----------------------------------------------------------------------------


def test_clopper_pearson_closed_forms():
    # all n caught: the lower bound solves p^n = 1 - confidence
    assert clopper_pearson_lower(10, 10) == pytest.approx(0.05 ** (1 / 10), abs=1e-9)  # 0.7411
    # none flagged: the upper bound solves (1 - p)^n = 1 - confidence (the "rule of three" for large n)
    assert clopper_pearson_upper(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-9)  # 0.2589
    assert clopper_pearson_upper(0, 300) == pytest.approx(3 / 300, rel=0.01)
    assert clopper_pearson_lower(0, 10) == 0.0 and clopper_pearson_upper(10, 10) == 1.0


def test_clopper_pearson_tabulated_interval():
    # the textbook two-sided 95 % interval for 5 of 10 is (0.1871, 0.8129): two one-sided 97.5 % bounds
    assert clopper_pearson_lower(5, 10, 0.975) == pytest.approx(0.18709, abs=1e-4)
    assert clopper_pearson_upper(5, 10, 0.975) == pytest.approx(0.81291, abs=1e-4)


def test_clopper_pearson_matches_the_binomial_tail():
    # 19 of 20: the lower bound p solves P(X >= 19 | n=20, p) = 0.05, i.e. p^20 + 20 p^19 (1 - p) = 0.05
    expected = brentq(lambda p: p**20 + 20 * p**19 * (1 - p) - 0.05, 0.01, 0.999)
    assert clopper_pearson_lower(19, 20) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        clopper_pearson_lower(3, 2)
    with pytest.raises(ValueError):
        clopper_pearson_upper(1, 2, confidence=1.0)


def test_operating_point_bounds():
    labels = np.r_[np.zeros(10), np.ones(10)]
    scores = np.r_[np.arange(10) / 10, 1 + np.arange(10) / 10]
    bounds = operating_point_bounds(operating_point(labels, scores, 0.95))  # all 10 caught, 0 of 10 flagged
    assert bounds["recall_lower"] == pytest.approx(0.05 ** 0.1)
    assert bounds["fpr_upper"] == pytest.approx(1 - 0.05 ** 0.1)
    assert operating_point_bounds(operating_point(np.zeros(3), np.ones(3), 0.5))["recall_lower"] is None


# --- synthetic defects --------------------------------------------------------------------------


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(0.5 + 0.05 * rng.standard_normal((48, 64, 3)), 0, 1).astype(np.float32) for _ in range(count)]


def test_coil_defect_changes_only_its_mask():
    image = _images(1)[0]
    damaged, mask = paste_coil_defect(image, "scratch", np.random.default_rng(0))
    assert damaged.shape == image.shape and mask.any()
    changed = np.abs(damaged - image).max(axis=2) > 0
    assert changed.any() and not (changed & ~mask).any()


def test_cut_paste_copies_donor_texture_into_the_mask():
    image, donor = np.zeros((48, 64, 3), np.float32), np.full((40, 40, 3), 0.5, np.float32)
    damaged, mask = cut_paste(image, donor, np.random.default_rng(1))
    assert mask.any() and np.all(damaged[~mask] == 0)
    assert np.all((damaged[mask] >= 0.4) & (damaged[mask] <= 0.6))  # donor level, brightness-jittered


def test_synthetic_defects_cycle_through_every_kind():
    images = _images(4)
    produced = list(synthetic_defects(images, per_image=7, seed=3))
    assert len(produced) == 28
    kinds = [kind for kind, _ in produced]
    assert kinds[:7] == list(SYNTHETIC_KINDS) and CUT_PASTE in kinds
    assert all(not np.array_equal(image, images[i // 7]) for i, (_, image) in enumerate(produced))
    again = list(synthetic_defects(images, per_image=7, seed=3))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(produced, again))  # seeded
    with pytest.raises(ValueError, match="unknown"):
        list(synthetic_defects(images, 1, kinds=["meteor"]))


def test_score_histogram_draws_the_threshold(tmp_path):
    path = tmp_path / "h.png"
    save_score_histogram(path, np.linspace(0, 1, 50), np.linspace(0.8, 2, 20), threshold=0.9)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (400, 720, 3)
    assert np.all(pixels == HISTOGRAM_THRESHOLD_COLOR, axis=2).sum() > 100


# --- tasks on a tiny trained model --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_coils, tmp_path_factory):
    cfg = compose_task("train", ["model/encoder=tiny", "trainer.max_steps=4", "trainer.warmup_steps=1",
                                 "trainer.stats_images=8", "trainer.device=cpu", *tiny_data_overrides(tiny_coils)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path_factory.mktemp("train"))
    return train.run(cfg)["checkpoint"]


def _task(name: str, ckpt, out, *overrides: str):
    cfg = compose_task(name, [f"ckpt={ckpt}", "device=cpu", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def test_threshold_for_recall_reports_bounds(checkpoint_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)  # threshold writes into the checkpoint; keep the shared one clean
    result = threshold.run(_task("threshold", ckpt, tmp_path, "target_recall=0.9"))
    achieved, bounds = result["achieved"], result["bounds"]
    assert achieved["recall"] >= 0.9
    assert bounds["recall_lower"] == pytest.approx(clopper_pearson_lower(achieved["tp"], achieved["n_defective"]))
    assert bounds["fpr_upper"] == pytest.approx(clopper_pearson_upper(achieved["fp"], achieved["n_good"]))
    assert bounds["recall_lower"] < achieved["recall"]
    assert json.loads((tmp_path / "threshold.json").read_text())["bounds"] == bounds


def test_threshold_synthetic_is_labelled_an_estimate(checkpoint_dir, tiny_coils, tmp_path):
    # good images only: the validation folder holds no defect
    good_only = tmp_path / "good_only"
    shutil.copytree(tiny_coils / "train", good_only / "train")
    shutil.copytree(tiny_coils / "test" / "good", good_only / "test" / "good")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    result = threshold.run(_task("threshold", ckpt, tmp_path / "t", "method=synthetic", "target_recall=0.8",
                                 "data=folder", f"data.root={good_only}", "data.num_workers=0",
                                 "synthetic.per_image=7"))
    assert result["estimate"] is True and "synthetic" in result["note"]
    synthetic = result["synthetic"]
    assert set(synthetic["per_kind_recall"]) == set(SYNTHETIC_KINDS)
    assert synthetic["estimated_recall"] >= 0.8
    assert synthetic["bounds"]["recall_lower"] < synthetic["estimated_recall"]
    assert result["achieved"]["n_defective"] == 0 and result["achieved"]["n_good"] == 6
    saved = json.loads((ckpt / "threshold.json").read_text())
    assert saved["method"] == "synthetic" and saved["threshold"] == pytest.approx(result["threshold"])


def test_validate_false_positive_report(checkpoint_dir, tiny_coils, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_coils, data)
    # a good test image that is a training image: the nearest training image is itself
    shutil.copyfile(data / "train" / "good" / "003.png", data / "test" / "good" / "copy_of_003.png")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    (ckpt / "threshold.json").write_text(json.dumps({"threshold": -1e9}))  # every image flagged
    result = validate.run(_task("validate", ckpt, tmp_path / "v", f"data.root={data}", "heatmaps=none"))
    folder = tmp_path / "v" / "false_positives"
    assert result["false_positives"]["flagged"] == 7
    assert json.loads((tmp_path / "v" / "metrics.json").read_text())["false_positives"]["flagged"] == 7
    assert (folder / "score_histogram.png").is_file()
    assert len(list((folder / "images").iterdir())) == 7 and len(list((folder / "heatmaps").iterdir())) == 7
    report = json.loads((folder / "report.json").read_text())
    assert report["n_good"] == 7 and set(report["recall_per_defect"]) == {
        "scratch", "dent", "pit", "stain", "roll_mark", "edge_crack"}
    assert all(r == 1.0 for r in report["recall_per_defect"].values())
    assert report["train_root"] == str(tiny_coils)  # compared with what the model was trained on
    copy = [e for e in report["flagged"] if e["path"].endswith("copy_of_003.png")][0]
    assert copy["nearest_train_distance"] == pytest.approx(0.0, abs=1e-5)
    assert copy["nearest_train_image"].endswith("003.png") and copy["unlike_training"] is False
    others = [e["nearest_train_distance"] for e in report["flagged"] if e is not copy]
    assert min(others) > copy["nearest_train_distance"]


def test_validate_without_threshold_draws_histogram_only(checkpoint_dir, tmp_path):
    result = validate.run(_task("validate", checkpoint_dir, tmp_path, "heatmaps=none"))
    assert result["false_positives"]["flagged"] is None
    assert (tmp_path / "false_positives" / "score_histogram.png").is_file()
    assert not (tmp_path / "false_positives" / "images").exists()


# --- extra confirmed-good images ----------------------------------------------------------------


def test_extra_good_images_join_the_training_set(tiny_coils, tmp_path):
    extra = tmp_path / "confirmed_good"
    shutil.copytree(tiny_coils / "test" / "good", extra)
    module = FolderDataModule(str(tiny_coils), extra_good=str(extra))
    module.prepare()
    paths = [s.path for s in module.train_samples()]
    assert len(paths) == 12 + 6 and sum(p.parent == extra for p in paths) == 6
    with pytest.raises(DatasetLayoutError, match="extra_good"):
        FolderDataModule(str(tiny_coils), extra_good=str(tmp_path / "missing")).prepare()


def test_fine_tune_with_extra_good_records_them(checkpoint_dir, tiny_coils, tmp_path):
    extra = tmp_path / "confirmed_good"
    shutil.copytree(tiny_coils / "test" / "good", extra)
    cfg = compose_task("train", [f"ckpt={checkpoint_dir}", f"data.extra_good={extra}",
                                 "trainer.max_steps=2",
                                 "trainer.warmup_steps=1", "trainer.stats_images=4", "trainer.device=cpu",
                                 *tiny_data_overrides(tiny_coils)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "fine")
    checkpoint = load_checkpoint(train.run(cfg)["checkpoint"])
    assert checkpoint.meta["train_images"] == 18 and checkpoint.meta["trainer_step"] == 2
    assert checkpoint.config.data.extra_good == str(extra)


def test_target_fpr_too_small_for_the_good_images_is_a_usage_error(checkpoint_dir, tmp_path):
    from anomcli.tasks.common import UsageError

    with pytest.raises(UsageError, match=r"1/\(n\+1\)"):  # 6 good images allow a >= 1/7
        threshold.run(_task("threshold", checkpoint_dir, tmp_path, "target_fpr=0.1"))
    assert not (tmp_path / "threshold.json").exists()
