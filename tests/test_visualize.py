"""Tests for anomcli.visualize: fixed colour scale, resizing, PNG output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomcli.visualize import (
    MASK_OUTLINE_COLOR,
    colorize,
    overlay,
    resize_map,
    save_overlay,
)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_colorize_shape_dtype_and_ends():
    colours = colorize(np.array([[-5.0, 0.0, 1.0, 9.0]]), low=0.0, high=1.0)
    assert colours.shape == (1, 4, 3) and colours.dtype == np.uint8
    assert (colours[0, 0] == colours[0, 1]).all()  # <= low: first colour
    assert (colours[0, 2] == colours[0, 3]).all()  # >= high: last colour
    assert _luma(colours[0, 0]) < 10 and _luma(colours[0, 3]) > 200


def test_colorize_brightness_rises_with_score():
    colours = colorize(np.linspace(0.0, 1.0, 256)[None, :], 0.0, 1.0)[0]
    # inferno rises in perceptual lightness; Rec.601 luma follows it up to
    # uint8 rounding in the purple range.
    assert np.all(np.diff(_luma(colours)) >= -0.5)
    assert len(np.unique(colours, axis=0)) > 200  # a smooth 256-step table


def test_colorize_uses_the_fixed_scale_not_the_maps_range():
    calm = colorize(np.array([[0.30, 0.31, 0.32]]), 0.0, 1.0)
    with_outlier = colorize(np.array([[0.30, 0.31, 50.0]]), 0.0, 1.0)
    np.testing.assert_array_equal(calm[0, :2], with_outlier[0, :2])
    # a near-constant map is not stretched to the full colour range
    assert np.abs(calm[0, 0].astype(int) - calm[0, 2].astype(int)).max() <= 10


def test_colorize_nan_is_normal():
    colours = colorize(np.array([[np.nan, 0.0]]), 0.0, 1.0)
    np.testing.assert_array_equal(colours[0, 0], colours[0, 1])


def test_bad_scale_is_rejected():
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2)), 1.0, 1.0)


def test_resize_map_bilinear_float32():
    small = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float64)
    big = resize_map(small, 4, 8)
    assert big.shape == (4, 8) and big.dtype == np.float32
    assert np.all(np.diff(big[0]) >= 0) and 0.0 <= big.min() and big.max() <= 1.0
    assert 0.0 < big[0, 3] < 1.0  # interpolated, not nearest


def test_overlay_resizes_map_to_image():
    image = np.full((48, 64, 3), 0.5, np.float32)
    result = overlay(image, np.zeros((7, 9)), 0.0, 1.0)
    assert result.shape == (48, 64, 3) and result.dtype == np.uint8


def test_overlay_keeps_photo_where_score_is_low():
    image = np.full((10, 10, 3), 128, np.uint8)
    scores = np.zeros((10, 10))
    scores[5:, :] = 1.0
    result = overlay(image, scores, 0.0, 1.0, alpha=0.6)
    np.testing.assert_array_equal(result[:4], 128)  # normal region untouched
    assert not np.array_equal(result[8], image[8])  # defect region coloured


def test_overlay_accepts_grey_float_images():
    result = overlay(np.full((6, 5), 0.25), np.zeros((3, 3)), 0.0, 1.0)
    assert result.shape == (6, 5, 3)


def test_save_overlay_writes_png_of_image_size(tmp_path):
    image = np.full((40, 30, 3), 0.5, np.float32)
    mask = np.zeros((40, 30), bool)
    mask[10:25, 8:20] = True
    path = tmp_path / "nested" / "out" / "overlay.png"

    save_overlay(path, image, np.ones((5, 4)), 0.0, 1.0, mask=mask)

    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (30, 40)
        pixels = np.asarray(written.convert("RGB"))
    is_outline = np.all(pixels == MASK_OUTLINE_COLOR, axis=2)
    assert is_outline[10, 12] and is_outline[11, 12]  # 2 px band at the top edge
    assert not is_outline[17, 14]  # interior keeps the heat map
    assert not is_outline[0, 0]  # outside the mask


def test_save_overlay_rejects_mask_of_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="mask shape"):
        save_overlay(
            tmp_path / "x.png", np.zeros((8, 8, 3)), np.zeros((8, 8)), 0.0, 1.0,
            mask=np.zeros((4, 4), bool),
        )
