"""Synthetic defects pasted into real good images, to estimate recall when no defect is labelled.

Two kinds of damage are drawn:

- the coil generator's defects (`anomcli.data.coils.add_defect`: scratch, dent,
  pit, stain, roll mark, edge crack), added to the image's brightness;
- cut-paste (Li et al., "CutPaste: Self-Supervised Learning for Anomaly
  Detection and Localization", CVPR 2021): a rectangle of texture cut from
  another good image, jittered in brightness, pasted at a random place.

Recall measured on these is an estimate of recall on real defects, never a
measurement of it: real defects may be easier or harder than the synthetic ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .coils import DEFECT_TYPES, add_defect

CUT_PASTE = "cut_paste"
SYNTHETIC_KINDS: tuple[str, ...] = (*DEFECT_TYPES, CUT_PASTE)

# A cut-paste patch spans this share of each image side.
PATCH_SIDE_RANGE = (0.1, 0.3)
# Brightness change of the pasted patch, so it differs from its new surroundings
# the way a foreign patch of material would.
PATCH_GAIN_RANGE = (0.8, 1.2)


def paste_coil_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """float [H, W, 3] in [0, 1] -> (image with one coil-generator defect, bool mask [H, W])."""
    grey = image.mean(axis=2)
    damaged, mask = add_defect(grey, kind, rng)
    change = damaged.astype(np.float32) - grey  # the defect's own intensity change, per pixel
    return np.clip(image + change[..., None], 0.0, 1.0).astype(np.float32), mask


def cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a brightness-jittered rectangle of ``donor`` texture into ``image``: (result, bool mask)."""
    height, width = image.shape[:2]
    patch_h = max(2, int(rng.uniform(*PATCH_SIDE_RANGE) * height))
    patch_w = max(2, int(rng.uniform(*PATCH_SIDE_RANGE) * width))
    donor_h, donor_w = donor.shape[:2]
    patch_h, patch_w = min(patch_h, donor_h), min(patch_w, donor_w)
    source_y, source_x = rng.integers(0, donor_h - patch_h + 1), rng.integers(0, donor_w - patch_w + 1)
    patch = donor[source_y:source_y + patch_h, source_x:source_x + patch_w]
    # flips turn the donor's texture direction against the image's
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = patch * rng.uniform(*PATCH_GAIN_RANGE)
    target_y, target_x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
    result = image.copy()
    result[target_y:target_y + patch_h, target_x:target_x + patch_w] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[target_y:target_y + patch_h, target_x:target_x + patch_w] = True
    return np.clip(result, 0.0, 1.0).astype(np.float32), mask


def synthetic_defects(images: Sequence[np.ndarray], per_image: int, seed: int = 0,
                      kinds: Sequence[str] = SYNTHETIC_KINDS) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (kind, damaged image) ``per_image`` times for each good image, kinds taken in turn.

    Cut-paste takes its texture from another image of ``images`` (the image
    itself when there is only one).
    """
    unknown = set(kinds) - set(SYNTHETIC_KINDS)
    if unknown:
        raise ValueError(f"unknown synthetic defect kinds {sorted(unknown)}; valid: {', '.join(SYNTHETIC_KINDS)}")
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    rng = np.random.default_rng(seed)
    turn = 0
    for index, image in enumerate(images):
        for _ in range(per_image):
            kind = kinds[turn % len(kinds)]
            turn += 1
            if kind == CUT_PASTE:
                donor = images[(index + int(rng.integers(1, max(2, len(images))))) % len(images)]
                damaged, _ = cut_paste(image, donor, rng)
            else:
                damaged, _ = paste_coil_defect(image, kind, rng)
            yield kind, damaged
