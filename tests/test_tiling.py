"""Tiling: tile positions, stitching, no seams on good images, random training tiles, the tasks end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from anomcli.cli import check_overrides
from anomcli.data.datamodule import FolderDataModule, Sample, TilingError
from anomcli.data.tiling import RandomTileDataset, TileGrid, axis_positions, stitch
from anomcli.engine.checkpoint import load_checkpoint
from anomcli.engine.evaluate import predict
from anomcli.tasks import threshold, train, validate

from .helpers import compose_task


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 0.25), (257, 256, 0.5), (4096, 392, 0.1),
                                                 (300, 64, 0.0), (100, 100, 0.3)])
def test_tiles_cover_the_axis_with_at_least_the_requested_overlap(length, tile, overlap):
    starts = axis_positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length  # first and last tile end on the borders
    shared = [tile - (b - a) for a, b in zip(starts, starts[1:])]
    assert all(s >= overlap * tile - 1 for s in shared)  # rounding may lose one pixel
    assert all(s < tile for s in shared)  # no tile is a duplicate


def test_a_side_shorter_than_the_tile_is_one_tile():
    grid = TileGrid.for_image(40, 500, 64, 0.25)
    assert grid.tops == (0,) and grid.tile_h == 40 and grid.tile_w == 64
    assert grid.map_size(64) == (64, 500)


def test_stitching_tiles_of_one_field_gives_back_the_field():
    height, width, tile = 100, 300, 64
    rows, cols = np.mgrid[0:height, 0:width]
    field = torch.from_numpy((np.sin(rows / 20) + np.cos(cols / 30)).astype(np.float32))
    grid = TileGrid.for_image(height, width, tile, 0.25)
    maps = torch.stack([field[t:t + tile, l:l + tile] for t, l in grid.positions()])[:, None]
    torch.testing.assert_close(stitch(maps, grid, tile), field)


class EdgeEffectModel(torch.nn.Module):
    """A smooth anomaly map (local mean brightness) with the edge effect real models have:
    a zero-padded blur darkens the border of every tile it sees."""

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size

    def predict(self, images):
        brightness = images.mean(dim=1, keepdim=True)  # [B, 1, S, S]
        maps = F.avg_pool2d(brightness, 9, stride=1, padding=4, count_include_pad=True)
        return maps, maps.flatten(1).amax(dim=1)


def _seam_ratio(anomaly_map: np.ndarray, edges: list[int]) -> float:
    """Largest jump between neighbouring columns at tile edges / the 99th percentile of jumps elsewhere
    (image borders excluded)."""
    jumps = np.abs(np.diff(anomaly_map, axis=1))[8:-8].max(axis=0)  # [W - 1]
    at_edges = np.zeros(len(jumps), dtype=bool)
    for edge in edges:
        at_edges[max(0, edge - 6):edge + 6] = True
    inside = np.ones(len(jumps), dtype=bool)
    inside[:8] = inside[-8:] = False
    return float(jumps[at_edges & inside].max() / np.quantile(jumps[~at_edges & inside], 0.99))


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_a_good_image_shows_no_seams(tmp_path, overlap):
    # a brushed surface: smooth shading along the strip plus fine grain
    rng = np.random.default_rng(0)
    cols = np.arange(600)
    shading = 0.5 + 0.15 * np.sin(cols / 70.0)
    image = np.clip(shading[None, :] + rng.normal(0, 0.01, (96, 600)), 0, 1)
    path = tmp_path / "strip.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(path)
    model, tile = EdgeEffectModel(input_size=64), 64

    def stitched(tile_overlap):
        data = FolderDataModule(str(tmp_path), num_workers=0, tiling={"tile": tile, "overlap": tile_overlap})
        result = predict(model, data.loader([Sample(path, -1, "")], model.input_size), torch.device("cpu"))
        return result.maps[0].astype(np.float32)

    blended = stitched(overlap)
    grid = TileGrid.for_image(96, 600, tile, overlap)
    assert blended.shape == (96, 600)  # tile == input size: the map is at full resolution
    edges = sorted({left for left in grid.lefts[1:]} | {left + tile for left in grid.lefts[:-1]})
    assert _seam_ratio(blended, edges) < 1.5
    # the same model without overlap shows its tile edges: the check above can see seams
    hard = stitched(0.0)
    hard_edges = sorted(set(TileGrid.for_image(96, 600, tile, 0.0).lefts[1:]))
    assert _seam_ratio(hard, hard_edges) > 3


def test_training_draws_random_tiles_of_the_image(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (50, 300), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    dataset = RandomTileDataset([Sample(tmp_path / "a.png", 0, "good")], input_size=32, tile=32, seed=0)
    found = set()
    for _ in range(8):
        tile = (dataset[0]["image"][0].numpy() * 255).round().astype(np.uint8)  # [32, 32]; grey: all channels equal
        matches = [(t, l) for t in range(50 - 31) for l in range(300 - 31)
                   if np.array_equal(pixels[t:t + 32, l:l + 32], tile)]
        assert len(matches) == 1  # an exact crop at full resolution
        found.add(matches[0])
    assert len(found) > 4


def test_bad_tiling_settings_fail_clearly(tmp_path):
    assert "overlap" in check_overrides("train", ["data.tiling.overlapp=0.1"])
    for tiling in ({"tile": 256, "overlap": 1.0}, {"tile": -1}):
        with pytest.raises(TilingError, match="data.tiling"):
            FolderDataModule(str(tmp_path), tiling=tiling)
    cfg = compose_task("train", [f"data.root={tmp_path}", "data.tiling.tile=512", "data.tiling.overlap=0.5"])
    assert instantiate(cfg.data).tiling.tile == 512


def test_train_validate_infer_with_tiles(train_cfg, tiny_coils, tmp_path):
    """Trained on tiles; validate and infer tile the same way unless told otherwise."""
    with open_dict(train_cfg):
        train_cfg.data.tiling.tile = 40  # the coils are 64 x 96: 2 x 3 tiles
        train_cfg.trainer.max_steps = 2
    checkpoint = train.run(train_cfg)["checkpoint"]
    assert load_checkpoint(checkpoint).meta["tiling"] == {"tile": 40, "overlap": 0.25}

    cfg = compose_task("validate", [f"ckpt={checkpoint}", "heatmaps=all", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "validate")
    metrics = validate.run(cfg)
    assert metrics["counts"]["scored"] == 18 and "pixel" in metrics
    heatmap = Image.open(tmp_path / "validate" / "heatmaps" / "dent" / "000.png")
    assert heatmap.size == (96, 64)

    # synthetic defects are scored in tiles too; validate's false-positive report pools tile features
    cfg = compose_task("threshold", [f"ckpt={checkpoint}", "method=synthetic", "synthetic.per_image=1",
                                     "target_recall=0.5", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "threshold")
    assert np.isfinite(threshold.run(cfg)["threshold"])
    cfg = compose_task("validate", [f"ckpt={checkpoint}", "heatmaps=none", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "validate-again")
    report = validate.run(cfg)["false_positives"]
    assert report["flagged"] is not None

    from anomcli.tasks.common import data_module_for
    loaded = load_checkpoint(checkpoint)
    tiled = data_module_for(compose_task("validate", [f"ckpt={checkpoint}"]).data, loaded)
    untiled = data_module_for(compose_task("validate", [f"ckpt={checkpoint}", "data.tiling.tile=0"]).data, loaded)
    assert tiled.tiling.tile == 40 and not untiled.tiling.enabled
    sample = tiled.test_samples()[:1]
    tiled_map = predict(loaded.model, tiled.loader(sample, 56), torch.device("cpu")).maps[0]
    whole_map = predict(loaded.model, untiled.loader(sample, 56), torch.device("cpu")).maps[0]
    assert tiled_map.shape == TileGrid.for_image(64, 96, 40, 0.25).map_size(56) == (90, 134)
    assert whole_map.shape == (56, 56)
