"""Tests for anomcli.metrics: agreement with sklearn, brute force and hand-computed cases."""

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from anomcli.metrics import (
    aupro,
    f1_max,
    image_metrics,
    operating_point,
    pixel_metrics,
    threshold_for_fpr,
    threshold_for_recall,
)


def random_image_scores(seed: int = 0, n: int = 200):
    """Labels plus scores where defects score higher on average, with ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounding creates ties
    return labels, scores


def brute_force_f1(labels, scores):
    best_f1, best_threshold = 0.0, None
    for threshold in np.unique(scores):
        flagged = scores >= threshold
        tp = np.sum(flagged & (labels == 1))
        fp = np.sum(flagged & (labels == 0))
        fn = np.sum(~flagged & (labels == 1))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best_f1:
            best_f1, best_threshold = f1, threshold
    return best_f1, best_threshold


# --- image level -------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_agree_with_sklearn(seed):
    labels, scores = random_image_scores(seed)
    metrics = image_metrics(labels, scores)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["f1_max"] == pytest.approx(brute_force_f1(labels, scores)[0])
    # FPR at the first ROC point (highest threshold) reaching 95 % recall.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert metrics["fpr_at_95_recall"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    json.dumps(metrics)  # plain Python numbers only
    assert all(type(value) is float for value in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_max_matches_brute_force(seed):
    labels, scores = random_image_scores(seed, n=60)
    best_f1, threshold = f1_max(labels, scores)
    expected_f1, expected_threshold = brute_force_f1(labels, scores)
    assert best_f1 == pytest.approx(expected_f1)
    assert threshold == pytest.approx(expected_threshold)
    assert operating_point(labels, scores, threshold)["recall"] is not None


def test_fpr_at_95_recall_hand_made():
    # 20 defective scores 1..20; recall >= 0.95 needs 19 of them -> threshold 2.
    # Good scores: 3 of 10 are >= 2 -> FPR 0.3.
    defective = np.arange(1, 21, dtype=float)
    good = np.array([0.0, 0.5, 1.0, 1.5, 1.9, 1.99, 0.1, 2.0, 5.0, 30.0])
    labels = np.r_[np.ones(20), np.zeros(10)]
    scores = np.r_[defective, good]
    assert image_metrics(labels, scores)["fpr_at_95_recall"] == pytest.approx(0.3)


def test_operating_point_counts_hand_made():
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.4, 0.5, 0.8, 0.95]
    point = operating_point(labels, scores, 0.5)  # 0.5 itself is flagged
    assert point == {
        "threshold": 0.5,
        "recall": 0.75,
        "fpr": 2 / 3,
        "precision": 3 / 5,
        "tp": 3,
        "fp": 2,
        "tn": 1,
        "fn": 1,
        "n_good": 3,
        "n_defective": 4,
    }
    assert operating_point([0, 0], [0.1, 0.2], 0.5)["recall"] is None
    assert operating_point([1, 0], [0.1, 0.2], 0.5)["precision"] is None


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9, 0.95, 1.0])
def test_threshold_for_recall_is_highest_meeting_target(target):
    labels, scores = random_image_scores(seed=5, n=80)
    threshold = threshold_for_recall(labels, scores, target)
    assert threshold in scores[labels == 1]
    assert operating_point(labels, scores, threshold)["recall"] >= target
    higher = np.unique(scores[scores > threshold])
    for candidate in higher:
        assert operating_point(labels, scores, candidate)["recall"] < target


def test_threshold_for_recall_needs_defects():
    with pytest.raises(ValueError, match="defective"):
        threshold_for_recall([0, 0, 0], [0.1, 0.2, 0.3], 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        threshold_for_recall([0, 1], [0.1, 0.2], 0.0)


def test_conformal_threshold_known_scores():
    scores = np.arange(1, 20, dtype=float)[::-1]  # 1..19, order must not matter
    threshold, n, min_alpha = threshold_for_fpr(scores, alpha=0.1)
    # k = ceil(20 * 0.9) = 18 -> just above the 18th smallest score.
    assert threshold == np.nextafter(18.0, np.inf)
    assert (n, min_alpha) == (19, 1 / 20)
    assert np.sum(scores >= threshold) == 1  # only 19 is flagged
    # alpha exactly 1/(n+1) is allowed (k = n) despite float rounding.
    assert threshold_for_fpr(scores, alpha=1 / 20)[0] == np.nextafter(19.0, np.inf)
    assert threshold_for_fpr(scores, alpha=0.05)[0] == np.nextafter(19.0, np.inf)


def test_conformal_threshold_rejects_too_small_alpha():
    with pytest.raises(ValueError, match=r"1/\(n\+1\) = 0.05"):
        threshold_for_fpr(np.arange(1, 20), alpha=0.04)


def test_single_class_gives_none():
    metrics = image_metrics([1, 1, 1], [0.1, 0.5, 0.9])
    assert metrics == {"auroc": None, "ap": None, "f1_max": None, "fpr_at_95_recall": None}
    assert image_metrics([0, 0], [0.1, 0.2])["auroc"] is None
    assert f1_max([0, 0], [0.1, 0.2]) == (None, None)


def test_input_validation():
    with pytest.raises(ValueError, match="same length"):
        image_metrics([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        image_metrics([0, 1], [0.1, np.nan])


# --- pixel level -------------------------------------------------------------


def two_region_case():
    """Three 8x8 images whose PRO/FPR curve is known by hand.

    Regions: A (4 px, image 1), B (8 px, image 2); image 3 is good.
    Background pixels: 60 + 56 + 64 = 180.
      t in (0.6, 0.9]: A fully found, half of B -> PRO 0.75, FPR 0
      t in (0.3, 0.6]: + 8 background px of image 1 -> FPR 8/180
      t in (0.0, 0.3]: rest of B + 20 background px of image 3 -> PRO 1, FPR 28/180
    """
    masks = np.zeros((3, 8, 8), dtype=bool)
    maps = np.zeros((3, 8, 8))
    masks[0, 1:3, 1:3] = True
    maps[0, 1:3, 1:3] = 0.9
    maps[0, 6, :] = 0.6
    masks[1, 4:6, 2:6] = True
    maps[1, 4:6, 2:4] = 0.9
    maps[1, 4:6, 4:6] = 0.3
    maps[2].flat[:20] = 0.3
    return masks, maps


def test_aupro_hand_computed_two_regions():
    masks, maps = two_region_case()
    # Curve (0,0) (0,.75) (8/180,.75) (28/180,1) (1,1).
    # max_fpr 0.3 = 54/180: area = 8*.75 + 20*.875 + 26*1 = 49.5 (in 1/180 units).
    assert aupro(masks, maps) == pytest.approx(49.5 / 54, abs=1e-3)
    # max_fpr 0.1 = 18/180 lands on the sloped segment: PRO there = 0.875,
    # area = 8*.75 + 10*(.75+.875)/2 = 14.125.
    assert aupro(masks, maps, max_fpr=0.1) == pytest.approx(14.125 / 18, abs=1e-3)
    # A list of [H, W] arrays gives the same answer as one [N, H, W] array.
    assert aupro(list(masks), list(maps)) == aupro(masks, maps)


def test_aupro_regions_use_eight_connectivity():
    # A diagonal pair is one region (half found); an isolated pixel is fully found.
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[5, 5] = True
    amap = np.zeros((8, 8))
    amap[0, 0] = amap[5, 5] = 1.0
    # PRO jumps to (0.5 + 1)/2 = 0.75 at FPR 0, then rises linearly to 1 at FPR 1.
    expected = (0.75 * 0.3 + 0.25 * 0.3**2 / 2) / 0.3
    assert aupro([mask], [amap]) == pytest.approx(expected, abs=1e-3)


def test_aupro_perfect_map_is_one():
    masks, _ = two_region_case()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pixel_metrics(masks, masks.astype(float))["aupro"] == pytest.approx(1.0)


def test_aupro_none_without_regions():
    masks = np.zeros((2, 4, 4), dtype=bool)
    assert aupro(masks, np.random.default_rng(0).random((2, 4, 4))) is None


def test_pixel_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = rng.random((4, 16, 16)) + masks
    metrics = pixel_metrics(list(masks), list(maps))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert metrics["ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    json.dumps(metrics)


def test_pixel_metrics_subsample_stays_close():
    # Force the subsampling path on small data and check weights keep AP honest.
    rng = np.random.default_rng(1)
    masks = rng.random((10, 64, 64)) < 0.02
    maps = rng.normal(size=(10, 64, 64)) + 1.5 * masks
    exact = pixel_metrics(masks, maps)
    sampled = pixel_metrics(masks, maps, max_exact_pixels=1000, sample_size=10_000)
    assert sampled["auroc"] == pytest.approx(exact["auroc"], abs=0.02)
    assert sampled["ap"] == pytest.approx(exact["ap"], abs=0.05)
    assert sampled["f1_max"] == pytest.approx(exact["f1_max"], abs=0.05)
    assert sampled["aupro"] == exact["aupro"]  # AUPRO always uses every pixel


def test_pixel_metrics_single_class_gives_none():
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert pixel_metrics(masks, maps) == {"auroc": None, "ap": None, "f1_max": None, "aupro": None}


def test_pixel_input_validation():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics([np.zeros((4, 4), bool)], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="0/1"):
        pixel_metrics([np.full((4, 4), 255)], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="1 masks but 2 maps"):
        pixel_metrics([np.zeros((4, 4), bool)], [np.zeros((4, 4))] * 2)
