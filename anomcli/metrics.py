"""Anomaly-detection metrics: image and pixel AUROC, AP, F1-max, AUPRO, operating points.

One convention holds across the module: a sample (image or pixel) is predicted
defective when ``score >= threshold``. Labels are 0 = good, 1 = defective.

Every number returned is a plain Python ``float``/``int`` so results can go
straight into JSON. A metric that is undefined for the given data (one class
only, no defective pixels, ...) is returned as ``None`` rather than NaN.

AUPRO follows Bergmann et al., "The MVTec Anomaly Detection Dataset: A
Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV 2021
(per-region overlap integrated up to a false-positive rate of 0.3).

The false-positive-rate threshold uses the split-conformal quantile (Vovk et al.,
"Algorithmic Learning in a Random World", 2005; Angelopoulos & Bates, "A Gentle
Introduction to Conformal Prediction", 2021).

Confidence bounds on recall and FPR are exact binomial (Clopper & Pearson,
"The use of confidence or fiducial limits illustrated in the case of the
binomial", Biometrika 1934), one-sided.

Only numpy, scipy and scikit-learn are used, so the module works without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

# 8-connectivity: diagonal neighbours belong to the same defect region, as in the
# MVTec AD reference evaluation.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)

# Relative slack when rounding (n + 1)(1 - alpha) up: float noise such as
# 20 * (1 - 0.05) = 19.000000000000004 must not push k one rank too high.
CONFORMAL_ROUNDING_SLACK = 1e-9


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    """1-D float array of finite scores."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return scores


def _as_labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Check that labels are 0/1 and paired one-to-one with finite scores."""
    labels = np.asarray(labels).reshape(-1)
    scores = _as_scores(scores)
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must have the same length, got {labels.size} and {scores.size}"
        )
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    return labels.astype(np.int8), scores


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 1) and np.any(labels == 0))


def _as_mask_map_pairs(masks, maps) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair each [H, W] mask with its [H, W] map; accepts sequences or [N, H, W] arrays."""
    mask_list = _as_image_list(masks, "masks")
    map_list = _as_image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    if not mask_list:
        raise ValueError("masks and maps are empty")
    pairs = []
    for index, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise ValueError(f"image {index}: mask shape {mask.shape} != map shape {amap.shape}")
        if mask.dtype != bool:
            if np.any((mask != 0) & (mask != 1)):
                raise ValueError(f"image {index}: mask values must be boolean or 0/1")
            mask = mask.astype(bool)
        if not np.issubdtype(amap.dtype, np.floating):
            amap = amap.astype(np.float64)
        if not np.all(np.isfinite(amap)):
            raise ValueError(f"image {index}: map contains NaN or inf")
        pairs.append((mask, amap))
    return pairs


def _as_image_list(images, name: str) -> list[np.ndarray]:
    if not isinstance(images, Sequence):  # one array-like: [H, W] or [N, H, W]
        images = np.asarray(images)
        if images.ndim == 2:
            return [images]
        if images.ndim != 3:
            raise ValueError(f"{name} must be [H, W], [N, H, W] or a sequence of [H, W]")
        return list(images)
    image_list = [np.asarray(image) for image in images]
    for index, image in enumerate(image_list):
        if image.ndim != 2:
            raise ValueError(f"{name}[{index}] must be 2-D [H, W], got shape {image.shape}")
    return image_list


def _as_float_or_none(value) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------------
# Threshold-free binary metrics (shared by image and pixel level)
# ---------------------------------------------------------------------------


def _best_f1(labels, scores, sample_weight=None) -> tuple[float, float]:
    """Best F1 over all thresholds and the (lowest) threshold reaching it."""
    precision, recall, thresholds = precision_recall_curve(
        labels, scores, sample_weight=sample_weight
    )
    # The final (precision=1, recall=0) point has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _ranking_metrics(labels, scores, sample_weight=None) -> dict:
    """AUROC, AP and F1-max; all None unless both classes are present."""
    if not _has_both_classes(labels):
        return {"auroc": None, "ap": None, "f1_max": None}
    return {
        "auroc": float(roc_auc_score(labels, scores, sample_weight=sample_weight)),
        "ap": float(average_precision_score(labels, scores, sample_weight=sample_weight)),
        "f1_max": _best_f1(labels, scores, sample_weight)[0],
    }


# ---------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------


def image_metrics(labels, scores) -> dict:
    """Image-level AUROC, AP, F1-max and FPR at 95 % recall.

    Every metric needs both good and defective images; with one class only all
    four are None (with no good images AP and F1 would be trivially 1).
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    metrics = _ranking_metrics(labels, scores)
    metrics["fpr_at_95_recall"] = None
    if _has_both_classes(labels):
        threshold = threshold_for_recall(labels, scores, 0.95)
        metrics["fpr_at_95_recall"] = operating_point(labels, scores, threshold)["fpr"]
    return metrics


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold achieving it.

    Predict defective when ``score >= threshold``; ties in F1 go to the lowest
    threshold. Returns ``(None, None)`` unless both classes are present.
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    if not _has_both_classes(labels):
        return None, None
    return _best_f1(labels, scores)


def operating_point(labels, scores, threshold: float) -> dict:
    """Confusion counts and rates when images with ``score >= threshold`` are flagged.

    A rate whose denominator is zero (no defective images for recall, no good
    images for FPR, nothing flagged for precision) is None.
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    flagged = scores >= threshold
    defective = labels == 1
    tp = int(np.sum(flagged & defective))
    fp = int(np.sum(flagged & ~defective))
    fn = int(np.sum(~flagged & defective))
    tn = int(np.sum(~flagged & ~defective))
    n_defective, n_good = tp + fn, fp + tn
    return {
        "threshold": float(threshold),
        "recall": tp / n_defective if n_defective else None,
        "fpr": fp / n_good if n_good else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n_good": n_good,
        "n_defective": n_defective,
    }


def threshold_for_recall(labels, scores, target_recall: float) -> float:
    """Highest threshold whose recall is at least ``target_recall``.

    The highest such threshold flags the fewest good images, so its FPR is the
    lowest among thresholds meeting the target. It is always one of the
    defective scores.
    """
    labels, scores = _as_labels_and_scores(labels, scores)
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    defective_scores = np.sort(scores[labels == 1])[::-1]
    n_defective = defective_scores.size
    if n_defective == 0:
        raise ValueError("threshold_for_recall needs at least one defective (label 1) image")
    # Thresholding at the j-th highest defective score flags at least j of them;
    # recall is computed as a ratio of counts, exactly as operating_point does.
    recall_at_rank = np.arange(1, n_defective + 1) / n_defective
    first_rank_meeting_target = int(np.argmax(recall_at_rank >= target_recall))
    return float(defective_scores[first_rank_meeting_target])


def threshold_for_fpr(good_scores, alpha: float) -> tuple[float, int, float]:
    """Conformal threshold that flags a new good image with probability at most ``alpha``.

    With n held-out good scores, let s_k be the k-th smallest with
    ``k = ceil((n + 1)(1 - alpha))``. If good scores are exchangeable, a new
    good image exceeds s_k with probability <= alpha. Because the module flags
    ``score >= threshold``, the threshold returned is the next float above s_k,
    so s_k and everything below it are not flagged.

    Returns ``(threshold, n, min_alpha)`` where ``min_alpha = 1 / (n + 1)`` is
    the smallest alpha n scores can support; a smaller alpha raises ValueError.
    """
    good_scores = np.sort(_as_scores(good_scores, "good_scores"))
    n = good_scores.size
    if n == 0:
        raise ValueError("threshold_for_fpr needs at least one good score")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    min_alpha = 1.0 / (n + 1)
    k = max(1, math.ceil((n + 1) * (1 - alpha) * (1 - CONFORMAL_ROUNDING_SLACK)))
    if k > n:
        raise ValueError(
            f"alpha={alpha} is too small for {n} good scores: the smallest alpha they allow "
            f"is 1/(n+1) = {min_alpha:.6g}; use more held-out good images or a larger alpha"
        )
    kth_smallest = good_scores[k - 1]
    return float(np.nextafter(kth_smallest, np.inf)), int(n), float(min_alpha)


def clopper_pearson_lower(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided exact lower bound on a binomial rate: P(true rate >= bound) >= ``confidence``.

    With ``k`` successes in ``n`` trials it is the ``1 - confidence`` quantile of
    Beta(k, n - k + 1); 0 when k = 0.
    """
    _check_binomial(successes, trials, confidence)
    if successes == 0:
        return 0.0
    return float(stats.beta.ppf(1 - confidence, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided exact upper bound on a binomial rate: P(true rate <= bound) >= ``confidence``.

    With ``k`` successes in ``n`` trials it is the ``confidence`` quantile of
    Beta(k + 1, n - k); 1 when k = n.
    """
    _check_binomial(successes, trials, confidence)
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(confidence, successes + 1, trials - successes))


def _check_binomial(successes: int, trials: int, confidence: float) -> None:
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def operating_point_bounds(point: dict, confidence: float = 0.95) -> dict:
    """One-sided Clopper-Pearson bounds for an ``operating_point`` result.

    ``recall_lower``: the recall is at least this with probability ``confidence``;
    ``fpr_upper``: the FPR is at most this. None where the point has no such images.
    """
    return {
        "confidence": float(confidence),
        "recall_lower": clopper_pearson_lower(point["tp"], point["n_defective"], confidence)
        if point["n_defective"] else None,
        "fpr_upper": clopper_pearson_upper(point["fp"], point["n_good"], confidence)
        if point["n_good"] else None,
    }


# ---------------------------------------------------------------------------
# Pixel level
# ---------------------------------------------------------------------------


def pixel_metrics(
    masks,
    maps,
    max_fpr: float = 0.3,
    *,
    max_exact_pixels: int = 20_000_000,
    sample_size: int = 4_000_000,
    seed: int = 0,
) -> dict:
    """Pixel-level AUROC, AP, F1-max over all pixels of all images, and AUPRO.

    ``masks`` are boolean (or 0/1) [H, W] ground truths, ``maps`` the float
    anomaly maps of the same shapes; either may be a sequence or one [N, H, W]
    array. Good images (empty masks) contribute background pixels only.

    Memory: when there are more than ``max_exact_pixels`` pixels, AUROC, AP and
    F1 are computed on a seeded random subsample of about ``sample_size``
    pixels. Defective pixels are all kept when they fit in half the budget;
    background pixels are drawn uniformly to fill the rest. Each kept pixel is
    weighted by (pixels of its class) / (kept pixels of its class), so the
    weighted class balance equals the full data's and AP/F1 are not inflated by
    the oversampled defects. AUPRO always uses every pixel (it streams one
    image at a time through a fixed threshold grid).

    AUROC, AP and F1 are None without both defective and background pixels;
    AUPRO is None without at least one defect region and one background pixel.
    """
    pairs = _as_mask_map_pairs(masks, maps)
    region_overlap = _aupro_from_pairs(pairs, max_fpr, num_thresholds=200)
    labels, scores, weights = _pixel_sample(pairs, max_exact_pixels, sample_size, seed)
    return {**_ranking_metrics(labels, scores, weights), "aupro": region_overlap}


def _pixel_sample(pairs, max_exact_pixels: int, sample_size: int, seed: int):
    """Flat (labels, scores, weights); every pixel with weights None when small enough."""
    n_pixels = sum(mask.size for mask, _ in pairs)
    if n_pixels <= max_exact_pixels:
        labels = np.concatenate([mask.ravel() for mask, _ in pairs]).astype(np.int8)
        scores = np.concatenate([amap.ravel() for _, amap in pairs])
        return labels, scores, None

    n_defective = sum(int(mask.sum()) for mask, _ in pairs)
    n_background = n_pixels - n_defective
    keep_defective = min(n_defective, sample_size // 2)
    keep_background = min(n_background, sample_size - keep_defective)
    defective_keep_rate = keep_defective / n_defective if n_defective else 0.0
    background_keep_rate = keep_background / n_background if n_background else 0.0

    # Bernoulli draws image by image keep memory at one image plus the sample.
    rng = np.random.default_rng(seed)
    label_parts, score_parts = [], []
    for mask, amap in pairs:
        flat_mask, flat_map = mask.ravel(), amap.ravel()
        rate_per_pixel = np.where(flat_mask, defective_keep_rate, background_keep_rate)
        kept = rng.random(flat_mask.size) < rate_per_pixel
        label_parts.append(flat_mask[kept])
        score_parts.append(flat_map[kept])
    labels = np.concatenate(label_parts).astype(np.int8)
    scores = np.concatenate(score_parts)

    # Inverse sampling-rate weights restore the true class balance.
    kept_defective = int(labels.sum())
    kept_background = labels.size - kept_defective
    weights = np.where(
        labels == 1,
        n_defective / max(kept_defective, 1),
        n_background / max(kept_background, 1),
    )
    return labels, scores, weights


def aupro(masks, maps, max_fpr: float = 0.3, num_thresholds: int = 200) -> float:
    """Normalised area under the per-region-overlap (PRO) vs FPR curve up to ``max_fpr``.

    Regions are the 8-connected components of each ground-truth mask. At a
    threshold t, PRO(t) is the mean over all regions of the fraction of the
    region with ``map >= t``, and FPR(t) the fraction of background pixels
    (over all images) with ``map >= t``.

    ``num_thresholds`` thresholds are spaced evenly from the smallest to the
    largest map value, plus t = +inf for the (0, 0) corner. Consecutive points
    are joined linearly, the point at exactly ``max_fpr`` is interpolated, and
    the trapezoid area is divided by ``max_fpr`` so a perfect map scores 1.0.
    The curve is exact when distinct map levels are further apart than the
    threshold spacing; otherwise it is a fine piecewise-linear approximation.

    Returns None without any defect region or without any background pixel.
    """
    pairs = _as_mask_map_pairs(masks, maps)
    return _aupro_from_pairs(pairs, max_fpr, num_thresholds)


def _aupro_from_pairs(pairs, max_fpr: float, num_thresholds: int) -> float | None:
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    curve = _pro_fpr_curve(pairs, num_thresholds)
    if curve is None:
        return None
    fpr, pro = curve
    return _normalised_partial_area(fpr, pro, max_fpr)


def _pro_fpr_curve(pairs, num_thresholds: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) points ordered by increasing FPR, from (0, 0) to (1, 1)."""
    lowest = min(float(amap.min()) for _, amap in pairs)
    highest = max(float(amap.max()) for _, amap in pairs)
    thresholds = np.linspace(lowest, highest, num_thresholds)
    num_bins = num_thresholds + 1

    # Bin b counts pixels with exactly b thresholds <= value, so the pixels
    # flagged at thresholds[i] are those in bins i + 1 and above.
    background_hist = np.zeros(num_bins, dtype=np.int64)
    region_hists, region_sizes = [], []
    for mask, amap in pairs:
        bins = np.searchsorted(thresholds, amap.ravel(), side="right")
        flat_mask = mask.ravel()
        background_hist += np.bincount(bins[~flat_mask], minlength=num_bins)
        regions, num_regions = ndimage.label(mask, structure=EIGHT_CONNECTIVITY)
        if num_regions == 0:
            continue
        region_ids = regions.ravel()[flat_mask] - 1  # [n_defective_pixels], 0-based
        joint = np.bincount(
            region_ids * num_bins + bins[flat_mask], minlength=num_regions * num_bins
        ).reshape(num_regions, num_bins)  # [regions, bins]
        region_hists.append(joint)
        region_sizes.append(joint.sum(axis=1))

    n_background = int(background_hist.sum())
    if not region_hists or n_background == 0:
        return None
    region_hist = np.concatenate(region_hists)  # [all regions, bins]
    region_size = np.concatenate(region_sizes)  # [all regions]

    # Reverse cumulative sums: pixels at or above each threshold.
    background_above = _count_at_or_above(background_hist)  # [thresholds]
    region_above = _count_at_or_above(region_hist)  # [regions, thresholds]
    fpr = background_above / n_background
    pro = (region_above / region_size[:, None]).mean(axis=0)

    # Thresholds ascend so both rates descend; reverse and prepend t = +inf.
    fpr = np.concatenate([[0.0], fpr[::-1]])
    pro = np.concatenate([[0.0], pro[::-1]])
    return fpr, pro


def _count_at_or_above(hist: np.ndarray) -> np.ndarray:
    """From [..., T + 1] bin counts, [..., T] counts of values >= each threshold."""
    reverse_cumulative = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return reverse_cumulative[..., 1:]


def _normalised_partial_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under pro(fpr) on [0, max_fpr], divided by max_fpr."""
    # Points with fpr <= max_fpr; on a vertical step at max_fpr keep its top.
    num_inside = int(np.searchsorted(fpr, max_fpr, side="right"))
    fpr_part, pro_part = fpr[:num_inside], pro[:num_inside]
    if fpr_part[-1] < max_fpr:
        # The curve ends at fpr = 1 >= max_fpr, so a point beyond always exists.
        x0, x1 = fpr[num_inside - 1], fpr[num_inside]
        y0, y1 = pro[num_inside - 1], pro[num_inside]
        pro_at_max = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        fpr_part = np.append(fpr_part, max_fpr)
        pro_part = np.append(pro_part, pro_at_max)
    return float(np.trapezoid(pro_part, fpr_part) / max_fpr)
