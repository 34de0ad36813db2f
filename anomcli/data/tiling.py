"""Large images in overlapping square tiles: cut, score tile by tile, stitch one seamless map.

A line-scan coil image is thousands of pixels wide and a defect may be a few
pixels across; resizing the whole strip to the model's input would erase it.
With tiling, each `tile` x `tile` window of the original image is resized to
the model's input (tile == input size: no resizing at all), scored, and the
tile maps are blended back into one map at `input_size / tile` times the image
resolution.

    positions   along each axis n = ceil((L - tile) / (tile * (1 - overlap))) + 1 tiles,
                spread evenly from 0 to L - tile, so neighbours share at least `overlap`
                of a tile and the last tile ends on the image border
    blending    every tile map is weighted by a Gaussian centred on the tile (sigma 1/8 of
                the tile side, as in MONAI's sliding-window inference) and the map is the
                weighted mean. Models have edge effects (padding, smoothing, position
                embeddings); the weight at a tile's edge is exp(-8) of its centre's, so
                where tiles overlap the one that sees a pixel away from its edge decides.
                The overlap must be wider than those edge effects (0.25 is)
    image score the highest tile score: a few-pixel defect is not averaged away by
                the good surface around it

A side shorter than `tile` is covered by one tile of that side's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .readable import ReadableImageDataset, collate

# blending window: Gaussian with this sigma as a share of the tile side
BLEND_SIGMA = 0.125


def axis_positions(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis of `length` pixels (see the module docstring)."""
    if length <= tile:
        return [0]
    stride = tile * (1 - overlap)
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie: (top, left) offsets of tiles of `tile_h` x `tile_w` pixels."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @classmethod
    def for_image(cls, height: int, width: int, tile: int, overlap: float) -> "TileGrid":
        tile_h, tile_w = min(tile, height), min(tile, width)
        return cls(height, width, tile_h, tile_w, tuple(axis_positions(height, tile_h, overlap)),
                   tuple(axis_positions(width, tile_w, overlap)))

    def positions(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    def map_size(self, input_size: int) -> tuple[int, int]:
        """(h, w) of the stitched map: the image at input_size / tile scale."""
        return self._scaled(self.height, self.tile_h, input_size), self._scaled(self.width, self.tile_w, input_size)

    @staticmethod
    def _scaled(pixels: int, tile: int, input_size: int) -> int:
        return max(1, round(pixels * input_size / tile))


def cut_tiles(image: np.ndarray, grid: TileGrid, input_size: int) -> torch.Tensor:
    """float [H, W, 3] image -> [N, 3, input_size, input_size] tiles in `grid.positions()` order."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W]
    tiles = torch.stack([x[:, top:top + grid.tile_h, left:left + grid.tile_w]
                         for top, left in grid.positions()])  # [N, 3, tile_h, tile_w]
    if (grid.tile_h, grid.tile_w) != (input_size, input_size):
        tiles = F.interpolate(tiles, size=(input_size, input_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0, 1)
    return tiles


def blend_window(height: int, width: int) -> torch.Tensor:
    """[height, width] weights: a Gaussian centred on the tile, 1 at the centre, exp(-8) at the edges."""

    def axis(n: int) -> torch.Tensor:
        offset = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (offset / (BLEND_SIGMA * n)) ** 2)

    return axis(height)[:, None] * axis(width)[None, :]


def stitch(maps: torch.Tensor, grid: TileGrid, input_size: int) -> torch.Tensor:
    """Tile maps [N, 1, S, S] (in `grid.positions()` order) -> one [h, w] map of the whole image."""
    out_h, out_w = grid.map_size(input_size)
    scale_h, scale_w = out_h / grid.height, out_w / grid.width
    total = torch.zeros(out_h, out_w, dtype=torch.float32, device=maps.device)
    weight = torch.zeros_like(total)
    for tile_map, (top, left) in zip(maps[:, 0].float(), grid.positions()):
        r0, c0 = round(top * scale_h), round(left * scale_w)
        r1, c1 = min(out_h, round((top + grid.tile_h) * scale_h)), min(out_w, round((left + grid.tile_w) * scale_w))
        if tile_map.shape != (r1 - r0, c1 - c0):
            tile_map = F.interpolate(tile_map[None, None], size=(r1 - r0, c1 - c0), mode="bilinear",
                                     align_corners=False)[0, 0]
        window = blend_window(r1 - r0, c1 - c0).to(total.device)
        total[r0:r1, c0:c1] += window * tile_map
        weight[r0:r1, c0:c1] += window
    return total / weight


def stitch_batch(maps: torch.Tensor, scores: torch.Tensor, grids: Sequence[TileGrid],
                 input_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Tile maps and scores of several images, concatenated -> (one [h, w] map per image, [B] scores)."""
    image_maps, image_scores, start = [], [], 0
    for grid in grids:
        end = start + len(grid)
        image_maps.append(stitch(maps[start:end], grid, input_size).cpu().numpy())
        image_scores.append(float(scores[start:end].max()))
        start = end
    return image_maps, np.array(image_scores, dtype=np.float32)


# --- datasets --------------------------------------------------------------------------

class TiledImageDataset(ReadableImageDataset):
    """Scoring: every image as all its tiles; an unreadable file yields its reason instead.

    tiles_per_forward: how many tiles the scorer passes to the model at once.
    """

    def __init__(self, samples, input_size: int, tile: int, overlap: float, tiles_per_forward: int = 16):
        super().__init__(samples, input_size)
        self.tile, self.overlap = tile, overlap
        self.tiles_per_forward = tiles_per_forward

    def item(self, image: np.ndarray) -> dict:
        grid = TileGrid.for_image(*image.shape[:2], self.tile, self.overlap)
        return {"image": cut_tiles(image, grid, self.input_size), "size": image.shape[:2], "grid": grid}


def collate_tiles(items: list[dict]) -> dict:
    """The tiles of the readable images, concatenated [sum N_i, 3, S, S], with each image's grid."""
    batch = collate(items, join=torch.cat)
    batch["grids"] = [item["grid"] for item in items if item["image"] is not None]
    return batch


class RandomTileDataset(ReadableImageDataset):
    """Training: one tile at a random position of each image, resized to the model's input.

    Positions come from a generator of the dataset's own (each loader worker has a copy), so
    drawing them leaves the global random stream, which draws the bottleneck noise, untouched.
    A resumed run draws new positions.
    """

    def __init__(self, samples, input_size: int, tile: int, seed: int = 0):
        super().__init__(samples, input_size)
        self.tile = tile
        self.generator = torch.Generator().manual_seed(seed)

    def item(self, image: np.ndarray) -> dict:
        height, width = image.shape[:2]
        tile_h, tile_w = min(self.tile, height), min(self.tile, width)
        top = int(torch.randint(height - tile_h + 1, (), generator=self.generator))
        left = int(torch.randint(width - tile_w + 1, (), generator=self.generator))
        grid = TileGrid(height, width, tile_h, tile_w, (top,), (left,))
        return {"image": cut_tiles(image, grid, self.input_size)[0], "size": (tile_h, tile_w)}
