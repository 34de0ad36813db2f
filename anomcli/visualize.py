"""Heat-map overlays of anomaly maps on the inspected image.

Colours use a FIXED scale ``[low, high]`` (typically the normal-data score
range and the decision threshold), never each map's own min/max: the same
score gets the same colour on every image, so a clean part stays dark
instead of having its noise stretched into a bright false alarm.

The colormap is inferno (matplotlib, van der Walt & Smith, CC0): perceptually
uniform, brightness rising with the score, readable in greyscale and by
colour-blind viewers. It is rebuilt from 17 anchor colours, so matplotlib is
not needed. Mask outlines are drawn in green, a hue inferno never uses.

Only numpy and Pillow are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# Every 16th entry (plus the last) of matplotlib's 256-entry inferno table.
_INFERNO_ANCHORS = np.array(
    [
        (0, 0, 4),
        (11, 7, 36),
        (33, 12, 74),
        (61, 9, 101),
        (87, 16, 110),
        (113, 25, 110),
        (138, 34, 106),
        (163, 44, 97),
        (188, 55, 84),
        (210, 70, 68),
        (228, 90, 49),
        (241, 115, 29),
        (249, 142, 9),
        (252, 172, 17),
        (249, 203, 53),
        (242, 234, 105),
        (252, 255, 164),
    ],
    dtype=np.float64,
)
_COLORMAP_SIZE = 256

MASK_OUTLINE_COLOR = (0, 255, 0)
MASK_OUTLINE_WIDTH = 2  # pixels, drawn inside the mask edge


def _interpolate_colormap(anchors: np.ndarray, size: int) -> np.ndarray:
    """Linearly interpolate evenly spaced anchor colours to a uint8 [size, 3] table."""
    anchor_positions = np.linspace(0.0, 1.0, len(anchors))
    positions = np.linspace(0.0, 1.0, size)
    channels = [np.interp(positions, anchor_positions, anchors[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


_COLORMAP = _interpolate_colormap(_INFERNO_ANCHORS, _COLORMAP_SIZE)


def _check_scale(low: float, high: float) -> None:
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"colour scale needs finite low < high, got low={low}, high={high}")


def _normalise(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map scores onto [0, 1] on the fixed scale; NaN counts as normal (0)."""
    _check_scale(low, high)
    scores = np.asarray(anomaly_map, dtype=np.float32)
    unit = (scores - np.float32(low)) / np.float32(high - low)
    return np.clip(np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 or float [0, 1] image, grey or RGB -> float32 [H, W, 3]."""
    pixels = np.asarray(image)
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255.0
    else:
        pixels = np.clip(pixels.astype(np.float32), 0.0, 1.0)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] or [H, W], got shape {image.shape}")
    return pixels


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``[height, width]``, as float32."""
    scores = np.asarray(anomaly_map, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D [h, w], got shape {scores.shape}")
    if scores.shape == (height, width):
        return scores.copy()
    # Pillow mode "F" keeps float precision; PIL sizes are (width, height).
    resized = Image.fromarray(np.ascontiguousarray(scores)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def colorize(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Colour a map on the fixed scale: ``<= low`` darkest, ``>= high`` brightest.

    Returns uint8 ``[H, W, 3]``. The colour of a value depends only on
    ``low`` and ``high``, never on the other values in the map.
    """
    return _colours_of(_normalise(anomaly_map, low, high))


def _colours_of(unit: np.ndarray) -> np.ndarray:
    """Table lookup of normalised scores in [0, 1] -> uint8 [..., 3]."""
    indices = np.rint(unit * (_COLORMAP_SIZE - 1)).astype(np.intp)
    return _COLORMAP[indices]


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    low: float,
    high: float,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend the coloured map over the image; returns uint8 ``[H, W, 3]``.

    The map may have any size; it is resized (bilinear) to the image first.
    Each pixel's blend weight is ``alpha * sqrt(t)`` for its normalised score
    ``t`` in [0, 1]: scores at or below ``low`` leave the photo untouched,
    the square root makes mid-range scores visible rather than faint, and
    the colour is never more than ``alpha`` opaque so the defect stays visible.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    photo = _as_float_rgb(image)
    height, width = photo.shape[:2]
    scores = resize_map(anomaly_map, height, width)

    unit = _normalise(scores, low, high)
    heat = _colours_of(unit).astype(np.float32) / 255.0
    weight = (alpha * np.sqrt(unit))[:, :, None]  # [H, W, 1], broadcast over RGB
    blended = photo * (1.0 - weight) + heat * weight
    return np.rint(blended * 255.0).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary erosion.

    Edge padding, so a defect touching the image border gets no outline
    along the border itself.
    """
    padded = np.pad(mask, 1, mode="edge")
    return (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``width`` pixels just inside the edge of each mask region."""
    interior = mask
    for _ in range(width):
        interior = _erode(interior)
    return mask & ~interior


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    low: float,
    high: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> None:
    """Write ``overlay(...)`` as a PNG, creating parent folders.

    If ``mask`` (bool, image size) is given, its outline is drawn in green so
    the ground truth can be compared with the heat map.
    """
    rendered = overlay(image, anomaly_map, low, high, alpha)
    if mask is not None:
        defect = np.asarray(mask, dtype=bool)
        if defect.shape != rendered.shape[:2]:
            raise ValueError(
                f"mask shape {defect.shape} does not match image shape {rendered.shape[:2]}"
            )
        rendered[_outline(defect, MASK_OUTLINE_WIDTH)] = MASK_OUTLINE_COLOR

    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rendered).save(out_path, format="PNG")


# Score histogram: good in blue, defective in orange (distinguishable by colour-blind
# viewers), the threshold as a red vertical line.
HISTOGRAM_GOOD_COLOR = (70, 130, 200)
HISTOGRAM_DEFECTIVE_COLOR = (240, 150, 40)
HISTOGRAM_THRESHOLD_COLOR = (210, 30, 30)


def save_score_histogram(
    path: str | os.PathLike,
    good_scores: np.ndarray,
    defective_scores: np.ndarray,
    threshold: float | None = None,
    bins: int = 40,
    size: tuple[int, int] = (720, 400),
) -> None:
    """Write a PNG histogram of good vs defective image scores, with the threshold drawn.

    Each class is normalised to its own count (share of images per bin), so a
    class with few images stays visible next to a large one; bars of the two
    classes sit side by side within a bin.
    """
    from PIL import ImageDraw, ImageFont

    good = np.asarray(good_scores, dtype=np.float64)
    defective = np.asarray(defective_scores, dtype=np.float64)
    every = np.concatenate([good, defective, [] if threshold is None else [threshold]])
    if every.size == 0:
        raise ValueError("no scores to draw")
    low, high = float(every.min()), float(every.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    shares = [np.histogram(s, edges)[0] / max(s.size, 1) for s in (good, defective)]
    tallest = max(float(max(share.max() for share in shares)), 1e-12)

    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def x_of(score: float) -> float:
        return left + (score - low) / (high - low) * plot_w

    bin_w = plot_w / bins
    for offset, share, colour in ((0.0, shares[0], HISTOGRAM_GOOD_COLOR),
                                  (0.5, shares[1], HISTOGRAM_DEFECTIVE_COLOR)):
        for b, value in enumerate(share):
            if value > 0:
                x0 = left + (b + offset) * bin_w
                draw.rectangle([x0, top + plot_h * (1 - value / tallest), x0 + bin_w / 2 - 1, top + plot_h],
                               fill=colour)
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill=(0, 0, 0))
    draw.line([left, top, left, top + plot_h], fill=(0, 0, 0))
    for tick in np.linspace(low, high, 5):
        x = x_of(tick)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
        draw.text((x - 18, top + plot_h + 8), f"{tick:.4g}", fill=(0, 0, 0), font=font)
    draw.text((left + plot_w / 2 - 30, height - 20), "image score", fill=(0, 0, 0), font=font)
    draw.text((4, top - 14), f"share (max {tallest:.2f})", fill=(0, 0, 0), font=font)
    legend = [(HISTOGRAM_GOOD_COLOR, f"good (n={good.size})"),
              (HISTOGRAM_DEFECTIVE_COLOR, f"defective (n={defective.size})")]
    if threshold is not None:
        x = x_of(threshold)
        draw.line([x, top, x, top + plot_h], fill=HISTOGRAM_THRESHOLD_COLOR, width=2)
        legend.append((HISTOGRAM_THRESHOLD_COLOR, f"threshold {threshold:.4g}"))
    for i, (colour, text) in enumerate(legend):
        x = left + 10 + i * 200
        draw.rectangle([x, 12, x + 12, 24], fill=colour)
        draw.text((x + 18, 12), text, fill=(0, 0, 0), font=font)

    out_path = Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")
