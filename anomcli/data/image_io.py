"""Reading images and ground-truth masks from disk, and finding them in folders.

Every image, whatever its file format or Pillow mode, comes back as float32
``[H, W, 3]`` in ``[0, 1]``, scaled by its real bit depth (8-bit by 255, 16-bit
by 65535), with EXIF orientation applied and any alpha channel dropped (not
composited: the RGB values are what the camera saw).

Anything that stops a file from loading raises :class:`ImageReadError` whose
message is a one-line reason meant for the person running the line, e.g.
``"truncated or corrupt JPEG"`` or ``"empty file (0 bytes)"``.

Image size is checked from the file header before any pixel is decoded, so an
oversized image (or a decompression bomb) is refused without allocating it.

Only numpy and Pillow are used.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)

# Pillow's own hard limit (2 x its warning level). It admits the largest
# industrial area-scan sensors (151 MP) while refusing the gigapixel headers
# decompression bombs use; the float32 RGB result is 12 bytes per pixel
# (~2 GiB at the limit), so lower it with `max_pixels` on small machines.
MAX_IMAGE_PIXELS = 178_956_970

# Pillow checks pixel counts against a process-wide global; we swap it while
# reading a header (see _pillow_pixel_limit) and this lock keeps our swaps
# from interleaving.
_PILLOW_LIMIT_LOCK = threading.Lock()

# Errors Pillow and its codecs raise for damaged or cut-off pixel data.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error)

# Leading bytes of the formats we list, to say "corrupt PNG header" rather
# than "not an image" when Pillow cannot parse a file that claims to be one.
_MAGIC_NUMBERS = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_GIT_LFS_POINTER = b"version https://git-lfs"

_UINT16_MAX = 65535.0


class ImageReadError(Exception):
    """An image or mask file could not be read; ``str(e)`` is the reason.

    The reason is one line for a plant engineer (no traceback jargon); the
    offending file is kept in ``path`` so callers can prefix it.
    """

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else Path(path)


# --------------------------------------------------------------------------
# Opening the file: every filesystem failure gets its own reason.
# --------------------------------------------------------------------------


def _open_regular_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading, turning filesystem failures into reasons."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ImageReadError(
                f"broken symbolic link (its target {target} does not exist)", path
            ) from None
        raise ImageReadError("file not found", path) from None
    except PermissionError:
        raise ImageReadError("permission denied (cannot look up the file)", path) from None
    except OSError as error:
        raise ImageReadError(f"cannot access file ({error.strerror})", path) from None

    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError("is a directory, not an image file", path)
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO or device would block or stream forever.
        raise ImageReadError("not a regular file (device, pipe or socket)", path)
    if info.st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path)

    try:
        return open(path, "rb")
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except OSError as error:
        raise ImageReadError(f"cannot open file ({error.strerror})", path) from None


def _unrecognised_reason(handle: BinaryIO) -> str:
    """Explain why Pillow could not identify the file, from its first bytes."""
    handle.seek(0)
    head = handle.read(32)
    if head.startswith(_GIT_LFS_POINTER):
        return "Git LFS pointer, not the image itself (run `git lfs pull`)"
    for magic, format_name in _MAGIC_NUMBERS.items():
        if head.startswith(magic):
            return f"corrupt {format_name} header"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "corrupt WEBP header"
    return "not an image (unrecognised format)"


# --------------------------------------------------------------------------
# Decoding: header first, size check, then pixels.
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _pillow_pixel_limit(pixels: int | None) -> Iterator[None]:
    """Temporarily set Pillow's global decompression-bomb level (None = off).

    Pillow would otherwise warn or fail on its own level before we see the
    size, and its level cannot be raised when a caller passes a larger
    ``max_pixels``. Our header check is the limit that counts.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pillow_would_warn(pixels: int) -> bool:
    """Would Pillow's own level complain about an image of this many pixels?"""
    return Image.MAX_IMAGE_PIXELS is not None and pixels > Image.MAX_IMAGE_PIXELS


def _refuse_if_too_large(size: tuple[int, int], max_pixels: int, path: Path) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(
            f"image too large: {width}x{height} pixels exceeds the limit of "
            f"{max_pixels:,} pixels",
            path,
        )


def _decode_pixels(image: Image.Image) -> Image.Image:
    """Decode the pixel data and apply EXIF orientation."""
    image.load()
    # exif_transpose returns a copy (or the image itself when upright).
    return ImageOps.exif_transpose(image)


def _read_pil_image(path: Path, max_pixels: int) -> Image.Image:
    """Open, size-check and fully decode one file (first frame only)."""
    with _open_regular_file(path) as handle:
        try:
            with _pillow_pixel_limit(None):
                image = Image.open(handle)  # reads the header only
        except UnidentifiedImageError:
            raise ImageReadError(_unrecognised_reason(handle), path) from None
        except _DECODE_ERRORS as error:
            raise ImageReadError(f"unreadable image header ({error})", path) from None

        _refuse_if_too_large(image.size, max_pixels, path)
        format_name = image.format or "image"
        pixels = image.size[0] * image.size[1]
        try:
            if _pillow_would_warn(pixels):
                # Some decoders (TIFF, GIF) re-check Pillow's level while
                # decoding; lift it to this image, which we already accepted.
                with _pillow_pixel_limit(pixels):
                    return _decode_pixels(image)
            return _decode_pixels(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # Reached only if a frame inside the file is larger than its header says.
            raise ImageReadError(f"image too large: {error}", path) from None
        except MemoryError:
            width, height = image.size
            raise ImageReadError(
                f"not enough memory to decode a {width}x{height} image", path
            ) from None
        except _DECODE_ERRORS:
            raise ImageReadError(f"truncated or corrupt {format_name}", path) from None


# --------------------------------------------------------------------------
# Pillow mode -> float32 RGB in [0, 1].
# --------------------------------------------------------------------------


def _int32_to_unit(values: np.ndarray) -> np.ndarray:
    """Scale mode "I" data: 16-bit content by 65535, anything wider min-max.

    Pillow stores 16-bit PNG/TIFF data (and any 32-bit integer TIFF) as mode
    "I". Values inside [0, 65535] are taken to be 16-bit samples; true
    32-bit content has no fixed white point, so it is min-max scaled per
    image (values are then only comparable within one image).
    """
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= _UINT16_MAX:
        return values.astype(np.float32) / np.float32(_UINT16_MAX)
    return _min_max_scale(values.astype(np.float64))


def _float_to_unit(values: np.ndarray) -> np.ndarray:
    """Scale mode "F" data (float TIFF).

    Data already inside [0, 1] is kept as is. Anything else (radiometric
    units, depth maps, negative values) has no fixed white point, so it is
    min-max scaled per image. NaN and inf become 0 either way.
    """
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.float32)
    low, high = float(values[finite].min()), float(values[finite].max())
    if low >= 0.0 and high <= 1.0:
        scaled = values.astype(np.float32)
    else:
        scaled = _min_max_scale(np.where(finite, values, low).astype(np.float64))
    return np.where(finite, scaled, 0.0).astype(np.float32)


def _min_max_scale(values: np.ndarray) -> np.ndarray:
    """Map the image's own range onto [0, 1]; a flat image becomes all 0."""
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _grey_or_rgb_to_unit(image: Image.Image) -> np.ndarray:
    """Pixel values of a 1-, 8-, 16-, 32-bit or float image scaled to [0, 1]."""
    mode = image.mode
    values = np.asarray(image)
    if mode == "1":
        return values.astype(np.float32)
    if mode.startswith("I;16"):
        return values.astype(np.float32) / np.float32(_UINT16_MAX)
    if mode == "I":
        return _int32_to_unit(values)
    if mode == "F":
        return _float_to_unit(values)
    return values.astype(np.float32) / np.float32(255.0)  # L, RGB


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to one of 1, L, I;16*, I, F (grey) or RGB.

    Alpha is dropped, not composited: a transparent pixel keeps its colour.
    """
    mode = image.mode
    if mode in ("1", "L", "I", "F", "RGB") or mode.startswith("I;16"):
        return image
    if mode in ("LA", "La"):
        return image.convert("LA").getchannel("L")  # La is premultiplied; undo it
    if mode in ("P", "PA", "RGBa"):
        # Via RGBA: P -> RGB warns when the palette has transparency, and
        # premultiplied RGBa must be un-premultiplied first.
        image = image.convert("RGBA")
    # RGBA -> RGB in Pillow drops the alpha band; it does not composite.
    return image.convert("RGB")  # also CMYK, YCbCr, LAB, HSV, RGBX


def _to_float_rgb(image: Image.Image) -> np.ndarray:
    """Any decoded Pillow image -> float32 [H, W, 3] in [0, 1]."""
    values = _grey_or_rgb_to_unit(_normalise_mode(image))
    if values.ndim == 2:  # grey: three identical channels
        values = np.repeat(values[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.clip(values, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as float32 ``[H, W, 3]`` in ``[0, 1]``.

    Args:
        path: image file; only the first frame of multi-frame files is read.
        max_pixels: refuse images with more pixels than this (checked from
            the header, before decoding). Defaults to ``MAX_IMAGE_PIXELS``.

    Raises:
        ImageReadError: the file is missing, unreadable, empty, not an image,
            truncated or corrupt, or too large.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    file_path = Path(path)
    image = _read_pil_image(file_path, limit)
    try:
        return _to_float_rgb(image)
    except ValueError as error:  # a mode Pillow cannot convert to RGB
        raise ImageReadError(f"unsupported colour mode {image.mode} ({error})", file_path) from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` as ``load_image`` returns it, read from the header only.

    Raises:
        ImageReadError: as ``load_image`` does for files it cannot open or identify.
    """
    file_path = Path(path)
    with _open_regular_file(file_path) as handle:
        try:
            with _pillow_pixel_limit(None):
                image = Image.open(handle)  # reads the header only
        except UnidentifiedImageError:
            raise ImageReadError(_unrecognised_reason(handle), file_path) from None
        except _DECODE_ERRORS as error:
            raise ImageReadError(f"unreadable image header ({error})", file_path) from None
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112, 1)
        except _DECODE_ERRORS:
            orientation = 1
    # EXIF orientations 5-8 turn the image by 90 degrees; load_image applies them
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def load_mask(
    path: str | os.PathLike, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a ground-truth mask as bool ``[H, W]`` (True = defect).

    A pixel is defect when its brightest channel is above half the mask's own
    maximum, so 0/255 masks, 0/1 label masks and JPEG-compressed masks with
    ringing all binarise the same way; an all-black mask is all False.

    Args:
        path: mask image file.
        size: expected ``(height, width)``, normally the image's; a mismatch
            raises ImageReadError naming both sizes.
    """
    brightness = load_image(path).max(axis=2)
    peak = float(brightness.max())
    mask = brightness > peak / 2 if peak > 0 else np.zeros(brightness.shape, bool)
    if size is not None and tuple(mask.shape) != tuple(size):
        mask_height, mask_width = mask.shape
        height, width = size
        raise ImageReadError(
            f"mask size {mask_width}x{mask_height} does not match image size "
            f"{width}x{height} (width x height)",
            path,
        )
    return mask


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_image_extension(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _raise_walk_error(error: OSError) -> None:
    # os.walk skips unreadable folders silently by default; a dataset
    # silently missing a folder of images is worse than stopping.
    raise error


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted, matched by extension (any case).

    Hidden files and hidden folders (names starting with ".") are skipped.
    Symlinked sub-folders are not followed (avoids cycles); a symlinked
    ``folder`` itself is. Broken links with an image extension are listed so
    that ``load_image`` reports them rather than them vanishing silently.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")

    found: list[Path] = []
    for directory, subfolders, files in os.walk(root, onerror=_raise_walk_error):
        subfolders[:] = [name for name in subfolders if not _is_hidden(name)]  # prune walk
        found.extend(
            Path(directory) / name
            for name in files
            if not _is_hidden(name) and _has_image_extension(name)
        )
        if not recursive:
            break
    return sorted(found)
