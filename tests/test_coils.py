"""Tests of the synthetic coil generator: layout, determinism, masks, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomcli.data.coils import DEFECT_TYPES, add_defect, generate_coils, render_surface

SMALL = dict(n_train=3, n_test_good=2, n_test_per_defect=2, height=48, width=48)


def _png_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.png"))}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return generate_coils(tmp_path_factory.mktemp("coils") / "data", seed=0, **SMALL)


def test_layout_and_counts(small_dataset: Path):
    root = small_dataset
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    assert len(list((root / "test" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(("good",) + DEFECT_TYPES)
    for kind in DEFECT_TYPES:
        assert sorted(p.name for p in (root / "test" / kind).iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (root / "ground_truth" / kind).iterdir()) == ["000_mask.png", "001_mask.png"]
    manifest = json.loads((root / "coils.json").read_text())
    assert manifest["seed"] == 0 and manifest["n_train"] == 3 and manifest["defect_types"] == list(DEFECT_TYPES)
    # No staging folders are left beside the dataset.
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_images_are_8bit_grayscale_and_masks_binary(small_dataset: Path):
    for kind in DEFECT_TYPES:
        for image_path in sorted((small_dataset / "test" / kind).glob("*.png")):
            image = Image.open(image_path)
            mask = _load(small_dataset / "ground_truth" / kind / f"{image_path.stem}_mask.png")
            assert image.mode == "L" and image.size == (48, 48)
            assert mask.dtype == np.uint8 and mask.shape == (48, 48)
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).any()


def test_same_seed_gives_identical_files(tmp_path: Path, small_dataset: Path):
    again = generate_coils(tmp_path / "again", seed=0, **SMALL)
    assert _png_bytes(again) == _png_bytes(small_dataset)


def test_different_seed_gives_different_images(tmp_path: Path, small_dataset: Path):
    other = generate_coils(tmp_path / "other", seed=1, **SMALL)
    first, second = _png_bytes(small_dataset), _png_bytes(other)
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first if not name.startswith("ground_truth"))


def test_image_depends_only_on_seed_split_and_index(tmp_path: Path, small_dataset: Path):
    larger = generate_coils(tmp_path / "larger", seed=0, **{**SMALL, "n_train": 5})
    for name in ("000.png", "002.png"):
        assert (larger / "train" / "good" / name).read_bytes() == (small_dataset / "train" / "good" / name).read_bytes()
    # Train and test/good draw from different streams.
    assert (small_dataset / "train" / "good" / "000.png").read_bytes() != (
        small_dataset / "test" / "good" / "000.png"
    ).read_bytes()


def test_matching_manifest_skips_regeneration(tmp_path: Path):
    root = generate_coils(tmp_path / "cached", seed=3, **SMALL)
    mtimes = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    assert generate_coils(tmp_path / "cached", seed=3, **SMALL) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == mtimes


def test_overwrite_or_new_parameters_regenerate(tmp_path: Path):
    root = generate_coils(tmp_path / "cached", seed=3, **SMALL)
    manifest_mtime = (root / "coils.json").stat().st_mtime_ns
    (root / "stray.txt").write_text("left from the old dataset")
    generate_coils(root, seed=3, overwrite=True, **SMALL)
    assert not (root / "stray.txt").exists()
    assert (root / "coils.json").stat().st_mtime_ns >= manifest_mtime

    generate_coils(root, seed=3, **{**SMALL, "n_train": 1})
    assert [p.name for p in (root / "train" / "good").iterdir()] == ["000.png"]
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_refuses_to_replace_foreign_folder(tmp_path: Path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        generate_coils(foreign, **SMALL)
    assert (foreign / "notes.txt").exists()


def test_non_square_images(tmp_path: Path):
    root = generate_coils(tmp_path / "wide", seed=0, n_train=1, n_test_good=1, n_test_per_defect=1, height=32, width=80)
    for path in root.rglob("*.png"):
        assert _load(path).shape == (32, 80)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("shape", [(64, 64), (32, 96)])
def test_defect_changes_pixels_inside_its_mask(kind: str, shape: tuple[int, int]):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        image = render_surface(rng, *shape)
        before = image.copy()
        defective, mask = add_defect(image, kind, rng)
        np.testing.assert_array_equal(image, before)  # input untouched
        assert defective.dtype == np.float32 and defective.shape == shape
        assert mask.dtype == bool and mask.shape == shape and mask.any()
        assert 0.0 <= defective.min() and defective.max() <= 1.0
        change = np.abs(defective - image)
        inside = change[mask].mean()
        outside = change[~mask].mean() if (~mask).any() else 0.0
        assert inside > 0.02
        assert inside > 10 * outside


def test_good_surface_is_plausible():
    rng = np.random.default_rng(0)
    surfaces = np.stack([render_surface(rng, 64, 128) for _ in range(4)])
    assert surfaces.dtype == np.float32 and surfaces.shape == (4, 64, 128)
    assert 0.0 <= surfaces.min() and surfaces.max() <= 1.0
    # Streaks run along the rows: neighbours along a row agree far more than across rows.
    along = np.abs(np.diff(surfaces, axis=2)).mean()
    across = np.abs(np.diff(surfaces, axis=1)).mean()
    assert across > 1.5 * along
    # Images differ from one another.
    assert np.abs(surfaces[0] - surfaces[1]).mean() > 0.01


def test_unknown_kind_lists_valid_kinds():
    image = render_surface(np.random.default_rng(0), 32, 32)
    with pytest.raises(ValueError, match="scratch"):
        add_defect(image, "rust", np.random.default_rng(0))


@pytest.mark.parametrize(
    "overrides",
    [{"height": 31}, {"width": 16}, {"n_train": 0}, {"n_test_good": -1}, {"n_test_per_defect": 0}, {"seed": -1}],
)
def test_invalid_arguments_raise(tmp_path: Path, overrides: dict):
    with pytest.raises(ValueError):
        generate_coils(tmp_path / "bad", **{**SMALL, **overrides})
    assert not (tmp_path / "bad").exists()


def test_render_surface_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="height"):
        render_surface(np.random.default_rng(0), 16, 64)


def test_interrupted_run_leaves_nothing_at_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import anomcli.data.coils as coils

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(coils, "add_defect", fail)
    with pytest.raises(KeyboardInterrupt):
        generate_coils(tmp_path / "data", **SMALL)
    assert list(tmp_path.iterdir()) == []
