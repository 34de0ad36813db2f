"""Tests for anomcli.data.image_io: every Pillow mode, every failure reason."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from anomcli.data import image_io
from anomcli.data.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    load_image,
    load_mask,
)


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _assert_rgb_float(pixels: np.ndarray, height: int, width: int) -> None:
    assert pixels.dtype == np.float32
    assert pixels.shape == (height, width, 3)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


# --------------------------------------------------------------------------
# Modes and scaling
# --------------------------------------------------------------------------


def test_rgb_png_is_scaled_by_255(tmp_path):
    path = _save(Image.new("RGB", (4, 3), (255, 128, 0)), tmp_path / "rgb.png")
    pixels = load_image(path)
    _assert_rgb_float(pixels, 3, 4)
    np.testing.assert_allclose(pixels[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_grey_l_becomes_three_identical_channels(tmp_path):
    path = _save(Image.new("L", (5, 2), 51), tmp_path / "grey.png")
    pixels = load_image(path)
    _assert_rgb_float(pixels, 2, 5)
    np.testing.assert_allclose(pixels, 0.2, atol=1e-6)


def test_one_bit_image(tmp_path):
    image = Image.new("1", (4, 4), 0)
    image.putpixel((1, 2), 1)
    pixels = load_image(_save(image, tmp_path / "bits.png"))
    _assert_rgb_float(pixels, 4, 4)
    assert pixels[2, 1].tolist() == [1.0, 1.0, 1.0]
    assert pixels.sum() == 3.0


def test_la_keeps_grey_and_drops_alpha(tmp_path):
    path = _save(Image.new("LA", (2, 2), (200, 0)), tmp_path / "la.png")
    np.testing.assert_allclose(load_image(path), 200 / 255, atol=1e-6)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    path = _save(Image.new("RGBA", (2, 2), (200, 100, 50, 0)), tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(path)[0, 0], np.array([200, 100, 50]) / 255, atol=1e-6)


@pytest.mark.parametrize("with_transparency", [False, True])
def test_palette_colours_are_exact(tmp_path, with_transparency):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    options = {"transparency": 0} if with_transparency else {}
    path = _save(image, tmp_path / "palette.png", **options)
    with Image.open(path) as check:
        assert check.mode == "P"
    pixels = load_image(path)
    assert pixels[0, 0].tolist() == [1.0, 0.0, 0.0]  # transparent entry keeps its colour
    assert pixels[0, 1].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_pure_cyan_becomes_rgb_cyan(tmp_path, suffix):
    path = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / f"cmyk{suffix}")
    pixels = load_image(path)
    _assert_rgb_float(pixels, 8, 8)
    np.testing.assert_allclose(pixels[4, 4], [0.0, 1.0, 1.0], atol=0.02)


@pytest.mark.parametrize(
    "dtype, suffix",
    [("<u2", ".png"), ("<u2", ".tif"), (">u2", ".tif")],
    ids=["I;16-png", "I;16-tiff", "I;16B-tiff"],
)
def test_sixteen_bit_is_scaled_by_65535(tmp_path, dtype, suffix):
    values = np.array([[0, 32768, 65535]], dtype=dtype)
    path = _save(Image.fromarray(values), tmp_path / f"deep{suffix}")
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    pixels = load_image(path)
    _assert_rgb_float(pixels, 1, 3)
    np.testing.assert_allclose(pixels[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_mode_i_with_16_bit_content_is_scaled_by_65535(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.int32)
    path = _save(Image.fromarray(values), tmp_path / "int32.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    np.testing.assert_allclose(load_image(path)[0, :, 1], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_mode_i_with_wider_content_is_min_max_scaled(tmp_path):
    values = np.array([[-100, 100_000, 200_100]], dtype=np.int32)
    path = _save(Image.fromarray(values), tmp_path / "int32.tif")
    np.testing.assert_allclose(load_image(path)[0, :, 2], [0.0, 0.5, 1.0], atol=1e-6)


def test_float_tiff_in_unit_range_is_kept(tmp_path):
    values = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    np.testing.assert_allclose(load_image(path)[0, :, 0], [0.0, 0.25, 1.0], atol=1e-7)


def test_float_tiff_outside_unit_range_is_min_max_scaled(tmp_path):
    values = np.array([[-2.0, 3.0, 8.0, np.nan]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    np.testing.assert_allclose(load_image(path)[0, :, 0], [0.0, 0.5, 1.0, 0.0], atol=1e-6)


def test_ycbcr_and_lab_tiffs_convert_to_rgb(tmp_path):
    grey_ycbcr = _save(Image.new("YCbCr", (2, 2), (128, 128, 128)), tmp_path / "ycc.tif")
    white_lab = _save(Image.new("LAB", (2, 2), (255, 128, 128)), tmp_path / "lab.tif")
    np.testing.assert_allclose(load_image(grey_ycbcr), 128 / 255, atol=0.02)
    np.testing.assert_allclose(load_image(white_lab), 1.0, atol=0.02)


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("HSV", (0, 255, 255), [1.0, 0.0, 0.0]),  # pure red
        ("RGBX", (10, 20, 30, 0), [10 / 255, 20 / 255, 30 / 255]),
        ("RGBa", (100, 50, 25, 255), [100 / 255, 50 / 255, 25 / 255]),
        ("PA", (0, 0), [0.0, 0.0, 0.0]),
        ("La", (90, 255), [90 / 255] * 3),
    ],
)
def test_modes_that_no_file_format_stores(mode, colour, expected):
    # Pillow cannot write these modes to disk, so test the conversion itself.
    pixels = image_io._to_float_rgb(Image.new(mode, (3, 2), colour))
    _assert_rgb_float(pixels, 2, 3)
    np.testing.assert_allclose(pixels[1, 2], expected, atol=0.01)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("L", (3, 2), 0)  # 3 wide, 2 high
    image.putpixel((0, 0), 255)  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    pixels = load_image(_save(image, tmp_path / "rotated.png", exif=exif))
    assert pixels.shape == (3, 2, 3)  # displayed upright: 2 wide, 3 high
    assert pixels[0, 1, 0] == 1.0  # marker moved to the top-right corner


@pytest.mark.parametrize("suffix", [".bmp", ".webp", ".jpeg"])
def test_other_formats_load(tmp_path, suffix):
    options = {"lossless": True} if suffix == ".webp" else {}
    path = _save(Image.new("RGB", (6, 4), (0, 255, 0)), tmp_path / f"x{suffix}", **options)
    pixels = load_image(path)
    _assert_rgb_float(pixels, 4, 6)
    np.testing.assert_allclose(pixels[2, 3], [0.0, 1.0, 0.0], atol=0.02)


# --------------------------------------------------------------------------
# Failure reasons
# --------------------------------------------------------------------------


def _reason(path, **kwargs) -> str:
    with pytest.raises(ImageReadError) as caught:
        load_image(path, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def _truncated_copy(image: Image.Image, path: Path, fraction: float = 0.5) -> Path:
    image.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _noise_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_failure_reasons_are_specific(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    empty = tmp_path / "empty.png"
    empty.touch()
    text = tmp_path / "notes.png"
    text.write_text("this is a shift report, not a photo\n")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    broken_link = tmp_path / "link.png"
    broken_link.symlink_to(tmp_path / "gone.png")

    reasons = {
        "jpeg": _reason(_truncated_copy(_noise_image(), tmp_path / "cut.jpg")),
        "png": _reason(_truncated_copy(_noise_image(), tmp_path / "cut.png")),
        "empty": _reason(empty),
        "text": _reason(text),
        "directory": _reason(folder),
        "missing": _reason(tmp_path / "nowhere.png"),
        "broken_link": _reason(broken_link),
    }
    assert reasons["jpeg"] == "truncated or corrupt JPEG"
    assert reasons["png"] == "truncated or corrupt PNG"
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["text"] == "not an image (unrecognised format)"
    assert reasons["directory"] == "is a directory, not an image file"
    assert reasons["missing"] == "file not found"
    assert reasons["broken_link"].startswith("broken symbolic link")
    assert len(set(reasons.values())) == len(reasons)


def test_error_keeps_the_path(tmp_path):
    with pytest.raises(ImageReadError) as caught:
        load_image(tmp_path / "nowhere.png")
    assert caught.value.path == tmp_path / "nowhere.png"


def test_png_cut_inside_its_header(tmp_path):
    path = tmp_path / "stub.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert _reason(path) == "corrupt PNG header"


def test_git_lfs_pointer_is_explained(tmp_path):
    path = tmp_path / "lfs.png"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    assert "git lfs pull" in _reason(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(tmp_path):
    path = _save(Image.new("L", (2, 2)), tmp_path / "locked.png")
    path.chmod(0)
    try:
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _write_blank_1bit_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG, written without ever building it in Pillow."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )
    return path


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    path = _write_blank_1bit_png(tmp_path / "huge.png", 10_000, 10_000)

    def _decode_attempted(self, *args, **kwargs):
        raise AssertionError("pixels were decoded for a refused image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _decode_attempted)
    reason = _reason(path, max_pixels=1_000_000)
    assert reason == "image too large: 10000x10000 pixels exceeds the limit of 1,000,000 pixels"


@pytest.mark.parametrize("suffix", [".png", ".tif"])  # TIFF re-checks while decoding
def test_pixel_limit_can_be_raised_above_pillows_own(tmp_path, monkeypatch, suffix):
    path = _save(Image.new("L", (2_000, 10)), tmp_path / f"wide{suffix}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # Pillow would refuse
    assert load_image(path, max_pixels=20_000).shape == (10, 2_000, 3)
    assert Image.MAX_IMAGE_PIXELS == 5_000  # and its level is restored
    assert _reason(path, max_pixels=19_999).startswith("image too large")


def test_default_limit_admits_a_normal_image(tmp_path):
    assert image_io.MAX_IMAGE_PIXELS >= 151_000_000  # largest area-scan sensors
    path = _write_blank_1bit_png(tmp_path / "ok.png", 300, 200)
    assert load_image(path).shape == (200, 300, 3)


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def test_load_mask_binarises_0_255(tmp_path):
    values = np.zeros((4, 6), np.uint8)
    values[1:3, 2:5] = 255
    values[0, 0] = 40  # compression ringing stays background
    mask = load_mask(_save(Image.fromarray(values), tmp_path / "mask.png"))
    assert mask.dtype == bool and mask.shape == (4, 6)
    np.testing.assert_array_equal(mask, values == 255)


def test_load_mask_binarises_0_1_labels(tmp_path):
    values = np.zeros((3, 3), np.uint8)
    values[1, 1] = 1
    mask = load_mask(_save(Image.fromarray(values), tmp_path / "labels.png"))
    assert mask.sum() == 1 and mask[1, 1]


def test_load_mask_all_black_is_all_false(tmp_path):
    mask = load_mask(_save(Image.new("L", (3, 2)), tmp_path / "good.png"), size=(2, 3))
    assert mask.shape == (2, 3) and not mask.any()


def test_load_mask_size_mismatch_names_both_sizes(tmp_path):
    path = _save(Image.new("L", (8, 4)), tmp_path / "mask.png")
    with pytest.raises(ImageReadError) as caught:
        load_mask(path, size=(5, 7))
    assert "8x4" in str(caught.value) and "7x5" in str(caught.value)


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def test_list_images_recursive_sorted_case_insensitive_no_hidden(tmp_path):
    expected = [
        _touch(tmp_path / "a.PNG"),
        _touch(tmp_path / "b.jpeg"),
        _touch(tmp_path / "sub" / "c.TIF"),
        _touch(tmp_path / "sub" / "deeper" / "d.webp"),
    ]
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.png")
    _touch(tmp_path / ".cache" / "e.png")
    _touch(tmp_path / "sub" / "Thumbs.db")
    (tmp_path / "dir.png").mkdir()

    assert list_images(tmp_path) == expected
    assert list_images(tmp_path, recursive=False) == expected[:2]
    assert list_images(str(tmp_path)) == expected


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "nope")


def test_list_images_on_a_file(tmp_path):
    with pytest.raises(NotADirectoryError):
        list_images(_touch(tmp_path / "a.png"))
