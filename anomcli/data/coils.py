"""Synthetic aluminium-coil surfaces with pixel-accurate defect masks.

A procedural stand-in for a real coil-inspection dataset, written in the
MVTec AD folder layout (Bergmann et al., "MVTec AD - A Comprehensive
Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019) so the
same folder loader reads real and synthetic data:

    root/train/good/000.png
    root/test/good/000.png
    root/test/<defect>/000.png
    root/ground_truth/<defect>/000_mask.png      # 0 / 255
    root/coils.json                              # parameters it was built with

Good surfaces are rolled aluminium seen with the rolling direction
horizontal: fine streaks at several scales, low-frequency lighting and sheen
bands, mild sensor noise. Each defect is an additive intensity change whose
support is exactly its mask, so every pixel outside the mask is untouched.

Every image draws from its own generator, spawned from
``np.random.SeedSequence(seed)`` by (split, index), so an image depends only
on the seed and where it sits, never on how many images come before it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

DEFECT_TYPES: tuple[str, ...] = ("scratch", "dent", "pit", "stain", "roll_mark", "edge_crack")

MIN_SIDE = 32
MANIFEST_NAME = "coils.json"
# Bump when the rendering changes, so old datasets on disk stop matching.
GENERATOR_VERSION = 1

# Below this change (about 4 grey levels, close to the sensor noise) a defect is
# not visible, so it is trimmed away and left out of the mask.
VISIBLE_LEVEL = 0.015

# Spawn keys of the splits; test/<defect> uses DEFECT_SPLIT_KEY0 + its index.
TRAIN_SPLIT_KEY = 0
TEST_GOOD_SPLIT_KEY = 1
DEFECT_SPLIT_KEY0 = 2


# --------------------------------------------------------------------------
# Good surface
# --------------------------------------------------------------------------

# Streak scales of a rolled surface, as (sigma across rows, sigma along rows,
# share of the streak variance) in pixels at any image size: the texture is
# physical, so it does not stretch with the image.
STREAK_SCALES: tuple[tuple[float, float, float], ...] = (
    (0.45, 20.0, 0.25),  # fine grain, short
    (0.6, 70.0, 0.30),  # hairline streaks
    (1.3, 160.0, 0.20),  # wider rolling lines
    (3.5, 400.0, 0.12),  # broad bands along the coil
)
# A few rows carry a distinct long hairline (a groove from one roll asperity);
# they take a small share of the streak variance, enough to see, too little
# to pass for a defect.
HAIRLINE_SHARE = 0.04
HAIRLINE_ROW_FRACTION = 0.12


def _gaussian_blur_fft(source: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Anisotropic Gaussian blur via FFT, rescaled to unit variance.

    The FFT wraps around, which is harmless for a stationary texture and much
    faster than a spatial filter hundreds of pixels long.
    """
    height, width = source.shape
    freq_y = np.fft.fftfreq(height)[:, None]
    freq_x = np.fft.rfftfreq(width)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma_y * freq_y) ** 2 + (sigma_x * freq_x) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(source) * transfer, s=(height, width))
    return field / max(float(field.std()), 1e-12)


def _gaussian_filtered_noise(
    rng: np.random.Generator, height: int, width: int, sigma_y: float, sigma_x: float
) -> np.ndarray:
    """Unit-variance white noise blurred by an anisotropic Gaussian."""
    return _gaussian_blur_fft(rng.standard_normal((height, width)), sigma_y, sigma_x)


def _streak_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Zero-mean, unit-std reflectance streaks along the rows (rolling direction)."""
    texture = np.zeros((height, width))
    for sigma_y, sigma_x, share in STREAK_SCALES:
        # Jitter each scale's weight so images differ in character, not just level.
        weight = share * rng.uniform(0.7, 1.3)
        sigma_x = min(sigma_x, width / 2)
        texture += np.sqrt(weight) * _gaussian_filtered_noise(rng, height, width, sigma_y, sigma_x)
    # Hairlines: a few rows get a groove of fixed sign whose depth wanders
    # slowly along the row, so each line runs across the image.
    row_depth = (rng.random((height, 1)) < HAIRLINE_ROW_FRACTION) * rng.standard_normal((height, 1))
    if row_depth.any():
        wander = np.clip(1.0 + 0.6 * _gaussian_filtered_noise(rng, height, width, 0.1, min(80.0, width / 2)), 0, None)
        hairlines = _gaussian_blur_fft(row_depth * wander, 0.4, 2.0)
        texture += np.sqrt(HAIRLINE_SHARE) * hairlines
    return texture / texture.std()


def _lighting(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth illumination: base level, a linear gradient, sheen bands, slow blotches."""
    y, x = np.mgrid[0:height, 0:width]
    side = min(height, width)
    y_unit, x_unit = (y - height / 2) / side, (x - width / 2) / side

    base = rng.uniform(0.52, 0.66)
    gradient_angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.02, 0.07) * (np.cos(gradient_angle) * x_unit + np.sin(gradient_angle) * y_unit)

    # Curved coil surfaces catch the light in broad bands, mostly across or
    # along the rolling direction.
    sheen = np.zeros((height, width))
    for _ in range(rng.integers(1, 3)):
        band_angle = rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.15)
        across = np.cos(band_angle) * x_unit + np.sin(band_angle) * y_unit
        centre = rng.uniform(-0.5, 0.5)
        band_width = rng.uniform(0.12, 0.35)
        sheen += rng.uniform(-0.04, 0.07) * np.exp(-0.5 * ((across - centre) / band_width) ** 2)

    blotch_sigma = side / 5
    blotches = 0.012 * _gaussian_filtered_noise(rng, height, width, blotch_sigma, blotch_sigma)
    return base + gradient + sheen + blotches


def render_surface(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Render one defect-free coil surface, float32 [height, width] in [0, 1]."""
    _check_side(height, "height")
    _check_side(width, "width")
    lighting = _lighting(rng, height, width)
    streak_contrast = rng.uniform(0.045, 0.075)
    # Streaks vary the reflectance, so they scale with the light falling on them.
    surface = lighting * (1.0 + streak_contrast * _streak_texture(rng, height, width))
    sensor_noise = rng.uniform(0.005, 0.01) * rng.standard_normal((height, width))
    return np.clip(surface + sensor_noise, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------
# Defects: each returns a signed intensity change; its support is the mask.
# --------------------------------------------------------------------------


def _trim_invisible(strength: np.ndarray, amplitude: float) -> np.ndarray:
    """Shrink a [0, 1] strength map so parts too faint to see become exactly 0.

    Subtracting (rather than cutting) keeps the edge continuous while giving
    the defect a hard support that is the pixel-accurate mask.
    """
    floor = min(VISIBLE_LEVEL / max(abs(amplitude), 1e-6), 0.5)
    return np.clip((strength - floor) / (1.0 - floor), 0.0, 1.0)


def _random_sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _curve_distance(
    points_yx: np.ndarray, values: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to a sampled curve, and the value at the nearest sample.

    ``values`` carries a per-sample quantity (position along the curve, local
    width) out to the pixels nearest to that sample.
    """
    rows = np.round(points_yx[:, 0]).astype(int)
    cols = np.round(points_yx[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    not_on_curve = np.ones((height, width), dtype=bool)
    not_on_curve[rows[inside], cols[inside]] = False
    value_map = np.zeros((height, width))
    value_map[rows[inside], cols[inside]] = values[inside]
    if not_on_curve.all():
        return np.full((height, width), np.inf), value_map
    distance, (near_row, near_col) = ndimage.distance_transform_edt(not_on_curve, return_indices=True)
    return distance, value_map[near_row, near_col]


def _scratch(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A thin, long, slightly curved line at an angle to the streaks."""
    diagonal = np.hypot(height, width)
    length = rng.uniform(0.3, 0.75) * diagonal
    # Keep clear of the rolling direction, where a scratch would hide among streaks.
    angle = rng.choice([-1, 1]) * rng.uniform(np.deg2rad(12), np.deg2rad(80))
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = np.array([rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width])
    bow = rng.normal(0, 0.025) * length

    t = np.linspace(0.0, 1.0, int(3 * length))[:, None]
    # Quadratic bow: zero at both ends, largest in the middle.
    points = centre + (t - 0.5) * length * direction + 4 * t * (1 - t) * bow * normal
    distance, along = _curve_distance(points, t[:, 0], height, width)

    half_width = rng.uniform(0.6, 1.4)
    amplitude = _random_sign(rng) * rng.uniform(0.1, 0.28)
    # Ends fade out, and the depth wanders a little along the scratch.
    end_fade = np.clip(np.minimum(along, 1 - along) / 0.08, 0.0, 1.0)
    wander = np.interp(along, np.linspace(0.0, 1.0, 6), rng.uniform(0.6, 1.0, 6))
    strength = np.exp(-0.5 * (distance / half_width) ** 2) * end_fade * wander
    return amplitude * _trim_invisible(strength, amplitude)


def _dent(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An elliptical depression: lit on one side, shadowed on the other."""
    side = min(height, width)
    radius_a = rng.uniform(0.05, 0.14) * side
    radius_b = radius_a * rng.uniform(0.6, 1.0)
    tilt = rng.uniform(0, np.pi)
    centre_y = rng.uniform(radius_a, height - radius_a)
    centre_x = rng.uniform(radius_a, width - radius_a)

    y, x = np.mgrid[0:height, 0:width]
    dy, dx = y - centre_y, x - centre_x
    u = (np.cos(tilt) * dx + np.sin(tilt) * dy) / radius_a
    v = (-np.sin(tilt) * dx + np.cos(tilt) * dy) / radius_b
    r2 = u**2 + v**2
    inside = r2 < 1.0

    # Depth profile (1 - r^2)^2 has compact support and a smooth rim, so the
    # shading below fades to zero exactly at the edge of the dent.
    depth = np.where(inside, (1 - r2) ** 2, 0.0)
    grad_y, grad_x = np.gradient(depth)
    light_angle = rng.uniform(0, 2 * np.pi)
    shading = np.cos(light_angle) * grad_x + np.sin(light_angle) * grad_y
    shading /= max(float(np.abs(shading).max()), 1e-12)

    amplitude = rng.uniform(0.1, 0.25)
    # The floor of a dent also scatters a little light away from the camera.
    effect = amplitude * (shading - 0.25 * depth)
    return np.where(inside, effect, 0.0)


def _pit(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A small cluster of dark dots."""
    side = min(height, width)
    cluster_radius = rng.uniform(0.025, 0.07) * side
    centre = np.array([rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width])
    n_dots = rng.integers(4, 13)
    offsets = rng.normal(0, cluster_radius / 2, size=(n_dots, 2))
    dot_centres = centre + np.clip(offsets, -cluster_radius, cluster_radius)

    y, x = np.mgrid[0:height, 0:width]
    effect = np.zeros((height, width))
    for (dot_y, dot_x), dot_radius, dot_depth in zip(
        dot_centres, rng.uniform(1.0, 2.4, n_dots), rng.uniform(0.15, 0.3, n_dots)
    ):
        strength = np.exp(-((y - dot_y) ** 2 + (x - dot_x) ** 2) / dot_radius**2)
        # Darkest dot wins where dots overlap, rather than stacking to black.
        effect = np.minimum(effect, -dot_depth * _trim_invisible(strength, dot_depth))
    return effect


def _stain(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An oil spot: irregular darker blob, soft edge, slightly darker rim, mottled inside."""
    side = min(height, width)
    base_radius = rng.uniform(0.06, 0.17) * side
    centre_y = rng.uniform(0.2, 0.8) * height
    centre_x = rng.uniform(0.2, 0.8) * width

    y, x = np.mgrid[0:height, 0:width]
    radius = np.hypot(y - centre_y, x - centre_x)
    angle = np.arctan2(y - centre_y, x - centre_x)
    # Low angular harmonics make the outline irregular but smooth.
    outline = np.ones_like(angle)
    for harmonic in range(2, 8):
        outline += rng.uniform(0.0, 0.2) / harmonic**0.7 * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
    outline *= base_radius

    softness = rng.uniform(0.25, 0.6) * base_radius
    ramp = np.clip((outline - radius) / softness, 0.0, 1.0)
    coverage = ramp * ramp * (3 - 2 * ramp)  # smoothstep
    # Oil gathers at the rim as it spreads, and lies unevenly inside.
    rim = np.exp(-0.5 * ((outline - radius - 0.5 * softness) / (0.25 * softness)) ** 2)
    mottle = 0.85 + 0.15 * _gaussian_filtered_noise(rng, height, width, base_radius / 4, base_radius / 4)
    strength = np.clip(coverage * mottle + rng.uniform(0.0, 0.4) * rim * coverage, 0.0, None)
    strength /= max(float(strength.max()), 1e-12)

    amplitude = rng.uniform(0.08, 0.2)
    return -amplitude * _trim_invisible(strength, amplitude)


def _roll_mark(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The same short mark repeated at the roll's circumference along a row."""
    period = rng.uniform(0.16, 0.32) * width
    mark_length = period * rng.uniform(0.15, 0.35)
    mark_height = rng.uniform(1.5, 4.0) * max(1.0, min(height, width) / 256)
    mark_tilt = rng.normal(0, 0.3)
    row = rng.uniform(0.15, 0.85) * height
    first = rng.uniform(0, period)

    y, x = np.mgrid[0:height, 0:width]
    # Fold x onto one roll turn, centred on the nearest repeat of the mark.
    along = (x - first + period / 2) % period - period / 2
    across = y - row
    u = np.cos(mark_tilt) * along + np.sin(mark_tilt) * across
    v = -np.sin(mark_tilt) * along + np.cos(mark_tilt) * across
    # Super-Gaussian: flat-topped imprints with short edges, like a pressed mark.
    strength = np.exp(-((u / (mark_length / 2)) ** 4) - (v / mark_height) ** 2)

    amplitude = _random_sign(rng) * rng.uniform(0.1, 0.25)
    return amplitude * _trim_invisible(strength, amplitude)


def _crack_path(
    rng: np.random.Generator, start_yx: np.ndarray, heading: float, length: float
) -> tuple[np.ndarray, np.ndarray]:
    """A jagged random walk from ``start_yx``, densely sampled, and its position along it [0, 1]."""
    step = 1.5
    n_steps = max(int(length / step), 4)
    # Sharp random turns around a slowly drifting heading give the jagged look.
    headings = heading + np.cumsum(rng.normal(0, 0.08, n_steps)) + rng.normal(0, 0.55, n_steps)
    steps = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    vertices = start_yx + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    # Resample densely so the rasterised path has no gaps.
    t_vertices = np.linspace(0.0, 1.0, len(vertices))
    t = np.linspace(0.0, 1.0, 4 * len(vertices))
    points = np.stack([np.interp(t, t_vertices, vertices[:, i]) for i in range(2)], axis=1)
    return points, t


def _edge_crack(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dark jagged crack entering from the top or bottom edge, narrowing to a tip."""
    from_top = rng.random() < 0.5
    start = np.array([0.0 if from_top else height - 1.0, rng.uniform(0.1, 0.9) * width])
    heading = (np.pi / 2 if from_top else -np.pi / 2) + rng.normal(0, 0.3)
    length = rng.uniform(0.12, 0.4) * height
    points, along = _crack_path(rng, start, heading, length)
    mouth_width = rng.uniform(1.0, 2.2)
    widths = mouth_width * (1.0 - 0.7 * along)

    # Half the cracks fork part-way down into a shorter, thinner branch.
    if rng.random() < 0.5:
        fork = rng.integers(len(points) // 4, len(points) // 2)
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
        branch, branch_along = _crack_path(rng, points[fork], branch_heading, length * rng.uniform(0.2, 0.4))
        points = np.concatenate([points, branch])
        widths = np.concatenate([widths, widths[fork] * (1.0 - 0.6 * branch_along)])

    distance, local_width = _curve_distance(points, widths, height, width)
    strength = np.exp(-0.5 * (distance / np.maximum(local_width, 0.4)) ** 2)
    amplitude = rng.uniform(0.15, 0.3)
    return -amplitude * _trim_invisible(strength, amplitude)


DEFECT_RENDERERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "scratch": _scratch,
    "dent": _dent,
    "pit": _pit,
    "stain": _stain,
    "roll_mark": _roll_mark,
    "edge_crack": _edge_crack,
}
assert tuple(DEFECT_RENDERERS) == DEFECT_TYPES


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (image with one ``kind`` defect, its boolean mask); ``image`` is not changed.

    The mask is exactly the set of pixels the defect changes, before clipping
    to [0, 1]; it is never empty.
    """
    if kind not in DEFECT_RENDERERS:
        raise ValueError(f"unknown defect kind {kind!r}; valid kinds: {', '.join(DEFECT_TYPES)}")
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D [H, W], got shape {image.shape}")
    height, width = image.shape
    render = DEFECT_RENDERERS[kind]
    # Random placement can, rarely, leave a defect almost off the image; draw
    # again rather than hand back an empty mask.
    for _ in range(20):
        effect = render(rng, height, width)
        mask = effect != 0
        if mask.sum() >= 4:
            break
    else:
        raise RuntimeError(f"could not place a visible {kind!r} defect on a {height}x{width} image")
    if kind == "stain":
        effect = effect + _stain_damping(image, effect)
    defective = np.clip(image.astype(np.float64) + effect, 0.0, 1.0).astype(np.float32)
    return defective, mask


def _stain_damping(image: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """Oil fills the fine grooves, so streaks fade where the stain is strong."""
    strength = np.abs(effect) / max(float(np.abs(effect).max()), 1e-12)
    smooth = ndimage.gaussian_filter(image.astype(np.float64), sigma=(2.0, 6.0))
    return -0.5 * strength * (image - smooth)


# --------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------


def _check_side(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or value < MIN_SIDE:
        raise ValueError(f"{name} must be an integer >= {MIN_SIDE}, got {value!r}")


def _check_count(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _image_rng(seed: int, split_key: int, index: int) -> np.random.Generator:
    """Generator of one image: equal to SeedSequence(seed).spawn(...)[split_key].spawn(...)[index]."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_key, index)))


def _file_stem(index: int, count: int) -> str:
    """Zero-padded index, 3 digits as in MVTec AD, more if needed to keep names sorted."""
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")  # uint8 [H, W] -> mode "L"


def _write_good(folder: Path, seed: int, split_key: int, count: int, height: int, width: int) -> None:
    folder.mkdir(parents=True)
    for index in range(count):
        image = render_surface(_image_rng(seed, split_key, index), height, width)
        _save_png(_to_uint8(image), folder / f"{_file_stem(index, count)}.png")


def _write_defects(root: Path, seed: int, kind: str, count: int, height: int, width: int) -> None:
    image_folder = root / "test" / kind
    mask_folder = root / "ground_truth" / kind
    image_folder.mkdir(parents=True)
    mask_folder.mkdir(parents=True)
    split_key = DEFECT_SPLIT_KEY0 + DEFECT_TYPES.index(kind)
    for index in range(count):
        rng = _image_rng(seed, split_key, index)
        image, mask = add_defect(render_surface(rng, height, width), kind, rng)
        _save_png(_to_uint8(image), image_folder / f"{_file_stem(index, count)}.png")
        _save_png(mask.astype(np.uint8) * 255, mask_folder / f"{_file_stem(index, count)}_mask.png")


def _manifest(seed: int, n_train: int, n_test_good: int, n_test_per_defect: int, height: int, width: int) -> dict:
    return {
        "generator": "anomcli.data.coils",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "height": int(height),
        "width": int(width),
        "defect_types": list(DEFECT_TYPES),
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _replace_folder(staged: Path, root: Path) -> None:
    """Move a finished dataset into place; a dataset already there is removed after."""
    if not root.exists():
        os.replace(staged, root)
        return
    # A non-empty folder cannot be renamed over, so move the old one aside
    # first. In between, root is briefly absent, never half-written.
    retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, retired / root.name)
    os.replace(staged, root)
    shutil.rmtree(retired, ignore_errors=True)


def generate_coils(
    root: str | Path,
    *,
    seed: int = 0,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_per_defect: int = 10,
    height: int = 256,
    width: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic coil dataset under ``root`` (MVTec AD layout) and return ``root``.

    Returns at once if ``root/coils.json`` already records the same parameters,
    unless ``overwrite``. A dataset built with other parameters is replaced;
    a non-empty folder that is not a coils dataset is only replaced with
    ``overwrite``. The new dataset is built in a hidden sibling folder and
    renamed into place, so an interrupted run never leaves a partial dataset
    at ``root``.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_count(n_train, "n_train")
    _check_count(n_test_good, "n_test_good")
    _check_count(n_test_per_defect, "n_test_per_defect")
    _check_side(height, "height")
    _check_side(width, "width")

    root = Path(root).expanduser().absolute()
    manifest = _manifest(seed, n_train, n_test_good, n_test_per_defect, height, width)
    existing = _read_manifest(root)
    if existing == manifest and not overwrite:
        return root
    if root.exists() and not overwrite and existing is None and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {MANIFEST_NAME}; pass overwrite=True to replace it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_good(staged / "train" / "good", seed, TRAIN_SPLIT_KEY, n_train, height, width)
        _write_good(staged / "test" / "good", seed, TEST_GOOD_SPLIT_KEY, n_test_good, height, width)
        for kind in DEFECT_TYPES:
            _write_defects(staged, seed, kind, n_test_per_defect, height, width)
        # Manifest last: its presence is what marks the dataset complete.
        (staged / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp makes the folder private (0700); give it the usual permissions.
        staged.chmod(0o755)
        _replace_folder(staged, root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return root
