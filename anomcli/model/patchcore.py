"""PatchCore: a memory bank of locally aware patch features from a frozen encoder, thinned
by a greedy coreset; anomalies are patches far from everything the bank remembers.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    fit:     good images -> encoder taps (frozen) -> neighbourhood average per tap -> concat
             -> patch features [N, C] -> k-center greedy coreset on a random projection
             -> memory bank [M, C]
    predict: images -> patch features [B, h*w, C] -> distance to the nearest bank entry
    anomaly map = patch distances on the grid, upsampled to the input and smoothed
    image score = the largest patch distance, reweighted by how isolated its nearest
                  bank entry is (the paper's Eq. 7; num_neighbours=0 turns that off)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SmoothUpsample

# PatchCore smooths with sigma 4 on 256-px maps (as Dinomaly does); sigma is scaled with the map size.
REFERENCE_MAP_SIZE = 256
# Pairwise distances are worked out in blocks of about this many entries (16 MiB in float32):
# memory stays bounded whatever the sizes, and a block is still in cache when it is reduced.
PAIRWISE_BLOCK = 1 << 22
# Queries per block of the nearest-neighbour search.
QUERY_BLOCK = 4096
# Coreset search, speed only (the picks do not depend on them): candidates kept exact
# between refreshes, and how many of the largest distance bounds a refresh brings up to date.
CANDIDATE_POOL = 4096
UPDATE_BATCH = 1 << 16


# --- coreset --------------------------------------------------------------------

def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """[N, C] -> [N, dim] by a Gaussian matrix with N(0, 1/dim) entries.

    Johnson-Lindenstrauss: pairwise distances survive up to a small factor, so the
    coreset can be searched in `dim` dimensions instead of C.
    """
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features)


def _as_centres(points: torch.Tensor, points_sq: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Rows `indices` of the augmented points as the right-hand side of a distance product: [d + 1, k]."""
    centres = points[indices, :-1]  # [k, d]
    return torch.cat([-2 * centres, points_sq[indices, None]], dim=1).T  # columns (-2 c, |c|^2)


def _nearest_squared_distance(points: torch.Tensor, points_sq: torch.Tensor, centres: torch.Tensor,
                              rows: torch.Tensor) -> torch.Tensor:
    """Augmented points [N, d + 1] (last column 1), their squared norms [N], centres [d + 1, k]
    -> [n] squared distance from each of `rows` [n] to its nearest centre."""
    # |p - c|^2 = |p|^2 + (p, 1) . (-2 c, |c|^2): one matrix product per chunk of rows, whose
    # output stays small enough to be reduced while it is still in cache
    step = max(1, PAIRWISE_BLOCK // centres.shape[1])
    closest = torch.cat([(points[chunk] @ centres).amin(dim=1) for chunk in rows.split(step)])
    return (closest + points_sq[rows]).clamp_min_(0)


def greedy_coreset(features: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices [count] of the rows of `features` [N, C] that k-center greedy picks, in pick order.

    k-center greedy (farthest-point sampling): start from a seeded random row, then
    repeatedly add the row farthest from everything picked so far. Distances are measured
    after a seeded random projection to `projection_dim` dimensions; 0 (or a dimension
    no smaller than C) measures them on the features themselves.

    The picks are the plain algorithm's (up to float rounding on near-ties), found lazily
    instead of with one memory-bound pass over all N rows per pick. A row's distance to the
    picked set only shrinks, so a value that misses the latest picks is an upper bound.
    The rows with the largest bounds are brought up to date (`_settle_top`) and form a
    candidate pool, kept exact after every pick; while the pool's farthest row is at least
    as far as every bound outside it, it is the true farthest row. A row is brought up to
    date only when its bound reaches the top, with all the picks it missed in one matrix
    product, and rows that end up nearer than the final pick distance are never touched again.
    """
    num_rows, channels = features.shape
    if not 1 <= count <= num_rows:
        raise ValueError(f"cannot pick {count} of {num_rows} feature rows")
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if 0 < projection_dim < channels:
        points = random_projection(points, projection_dim, generator)
    points = points - points.mean(dim=0)  # same distances, smaller norms: less rounding in |p|^2 - 2 p.c + |c|^2
    points_sq = points.square().sum(dim=1)  # [N]
    points = F.pad(points, (0, 1), value=1.0)  # [N, d + 1]

    first = int(torch.randint(num_rows, (1,), generator=generator))
    picked = [first]
    every_row = torch.arange(num_rows, device=points.device)
    nearest = _nearest_squared_distance(points, points_sq, _as_centres(points, points_sq, picked), every_row)
    nearest[first] = -math.inf  # [N] bound on each row's squared distance to the picked set; picked: -inf
    applied = torch.ones_like(every_row)  # [N] the bound accounts for picked[:applied]
    while len(picked) < count:
        pool, bound = _settle_top(points, points_sq, nearest, applied, picked)
        pool_nearest, pool_points, pool_sq = nearest[pool], points[pool], points_sq[pool]  # exact
        while len(picked) < count:
            best = int(pool_nearest.argmax())
            if float(pool_nearest[best]) < bound:  # a row outside the pool may be farther
                break
            index = int(pool[best])
            picked.append(index)
            distance = (pool_points @ _as_centres(points, points_sq, [index]))[:, 0] + pool_sq  # [P]
            pool_nearest = torch.minimum(pool_nearest, distance.clamp_min_(0))
            pool_nearest[best] = -math.inf
        nearest[pool], applied[pool] = pool_nearest, len(picked)
    return torch.tensor(picked, dtype=torch.long, device=features.device)


def _settle_top(points: torch.Tensor, points_sq: torch.Tensor, nearest: torch.Tensor, applied: torch.Tensor,
                picked: list[int]) -> tuple[torch.Tensor, float]:
    """Bring rows up to date until the CANDIDATE_POOL largest bounds are exact.

    Returns those rows [P] and the largest bound outside them (-inf if there is none).
    """
    num_rows = len(nearest)
    while True:
        top = nearest.topk(min(CANDIDATE_POOL + 1, num_rows))
        pool = top.indices[:CANDIDATE_POOL]
        if bool((applied[pool] == len(picked)).all()):
            return pool, float(top.values[CANDIDATE_POOL]) if num_rows > CANDIDATE_POOL else -math.inf
        # update every stale row among the UPDATE_BATCH largest bounds, not just the pool's:
        # most of them would reach the top soon anyway, and big batches keep the products efficient
        threshold = nearest.kthvalue(num_rows - UPDATE_BATCH).values if num_rows > UPDATE_BATCH else -math.inf
        stale = torch.nonzero((nearest >= threshold) & (applied < len(picked))).squeeze(1)
        for start in applied[stale].unique().tolist():  # rows that missed the same picks, together
            rows = stale[applied[stale] == start]
            missed = _as_centres(points, points_sq, picked[start:])
            nearest[rows] = torch.minimum(nearest[rows], _nearest_squared_distance(points, points_sq, missed, rows))
        applied[stale] = len(picked)


# --- nearest neighbours ----------------------------------------------------------

def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[Q, C] queries, [M, C] bank (M >= k) -> (Euclidean distances [Q, k], bank indices [Q, k]), nearest first.

    Blocks of queries meet slices of the bank in turn, keeping a running top k, so about
    PAIRWISE_BLOCK distances exist at once whatever the bank's size.
    """
    if torch.onnx.is_in_onnx_export():
        # an exported graph has a dynamic batch, which Python-sized blocks cannot follow: one block
        return torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    query_rows = min(QUERY_BLOCK, len(queries))
    bank_rows = max(k, PAIRWISE_BLOCK // max(1, query_rows))
    distances, indices = [], []
    for block in queries.split(query_rows):
        best, best_index = None, None
        for start in range(0, len(bank), bank_rows):
            top = torch.cdist(block, bank[start:start + bank_rows]).topk(min(k, len(bank) - start), dim=1,
                                                                           largest=False)
            found, found_index = top.values, top.indices + start  # [q, <= k]
            if best is not None:  # merge with the nearest of the slices before
                found, order = torch.cat([best, found], dim=1).topk(k, dim=1, largest=False)
                found_index = torch.cat([best_index, found_index], dim=1).gather(1, order)
            best, best_index = found, found_index
        distances.append(best)
        indices.append(best_index)
    return torch.cat(distances), torch.cat(indices)


# --- the model ----------------------------------------------------------------

class PatchCore(nn.Module):
    """Frozen encoder + memory bank of patch features; `fit` fills the bank, nothing is trained.

    encoder: a frozen module returning a list of [B, prefix + h*w, D] tap tensors and
        exposing `embed_dim`, `taps`, `num_prefix_tokens`, `grid_size`, `input_size`.
    coreset_ratio: share of the training patch features kept in the bank (1 keeps all).
    projection_dim: dimensions of the random projection the coreset is searched in (0: none).
    neighbourhood: side of the square window each patch feature is averaged over (odd).
    num_neighbours: bank neighbours b in the image-score reweighting (0: plain max distance).
    map_sigma: Gaussian smoothing of the anomaly map at 256 px; scaled with the input size.
    seed: seeds the projection and the coreset's first pick.
    """

    def __init__(
        self,
        encoder: nn.Module,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        neighbourhood: int = 3,
        num_neighbours: int = 9,
        map_sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {projection_dim}")
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be a positive odd window side, got {neighbourhood}")
        if num_neighbours < 0:
            raise ValueError(f"num_neighbours must be >= 0 (0: no reweighting), got {num_neighbours}")
        self.encoder = encoder
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.neighbourhood = neighbourhood
        self.num_neighbours = num_neighbours
        self.seed = seed
        self.input_size = encoder.input_size
        # align_corners=False: patch i's value lands on its centre, (i + 0.5) * stride
        self.upsample = SmoothUpsample(encoder.grid_size, self.input_size,
                                       sigma=map_sigma * self.input_size / REFERENCE_MAP_SIZE, align_corners=False)
        # empty until fit(); persistent, so checkpoints carry it
        self.register_buffer("memory_bank", torch.zeros(0, encoder.embed_dim * len(encoder.taps)))

    # the bank's row count is set by fit(): checkpoint loading compares only its width
    data_sized_buffers = ("memory_bank",)

    def train(self, mode: bool = True) -> "PatchCore":
        super().train(mode)
        self.encoder.eval()  # frozen: its batch norm / dropout never train
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the bank's size is only known after fit: take the stored one's shape before loading
        stored = state_dict.get(prefix + "memory_bank")
        if stored is not None:
            self.memory_bank = self.memory_bank.new_empty(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- stages -------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [0, 1] -> locally aware patch features [B, h*w, C]."""
        side = self.encoder.grid_size
        pooled = []
        for tap in self.encoder(images):
            tokens = tap[:, self.encoder.num_prefix_tokens:]  # [B, h*w, D]
            B, N, D = tokens.shape
            grid = tokens.transpose(1, 2).reshape(B, D, side, side)  # [B, D, h, w]
            # each patch describes its neighbourhood; at the border only real patches count
            pooled.append(F.avg_pool2d(grid, self.neighbourhood, stride=1, padding=self.neighbourhood // 2,
                                       count_include_pad=False))
        return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)  # [B, h*w, C]

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Fill the memory bank from batches of defect-free images [B, 3, S, S] in [0, 1]."""
        device = self.memory_bank.device
        collected = [self.encode(images.to(device)).flatten(0, 1) for images in batches]  # each [B*h*w, C]
        if not collected:
            raise ValueError("PatchCore.fit got no images")
        features = torch.cat(collected)  # [N, C]
        count = max(1, int(len(features) * self.coreset_ratio))
        if count < len(features):
            features = features[greedy_coreset(features, count, self.projection_dim, self.seed)]
        self.memory_bank = features.contiguous()  # [M, C]

    def patch_distances(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, h*w, C] -> (distance to the nearest bank entry [B, h*w], that entry's index [B, h*w])."""
        if len(self.memory_bank) == 0:
            raise RuntimeError("PatchCore has no memory bank: train it first")
        B, N, C = features.shape
        distances, indices = nearest_neighbours(features.reshape(B * N, C), self.memory_bank)
        return distances.view(B, N), indices.view(B, N)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images -> (patch features [B, h*w, C], nearest distances [B, h*w], bank indices [B, h*w])."""
        features = self.encode(images)
        # distances to the bank stay in float32 under reduced-precision autocast
        with torch.autocast(images.device.type, enabled=False):
            features = features.float()
            return features, *self.patch_distances(features)

    def anomaly_map(self, distances: torch.Tensor) -> torch.Tensor:
        """Patch distances [B, h*w] -> [B, 1, S, S] anomaly map at the input resolution."""
        side = self.encoder.grid_size
        return self.upsample(distances.view(-1, 1, side, side))

    def score(self, distances: torch.Tensor, indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[B] image scores from the patch distances [B, h*w], their bank indices and the features.

        s* = the largest patch distance, between test patch m_test* and bank entry m*.
        With num_neighbours = b > 0 it is scaled as in the paper's Eq. 7,
            s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*,
        where N_b(m*) are the b bank entries nearest m* (m* among them): a test patch
        near an isolated, rare bank entry scores higher than one near a dense region.
        """
        batch = torch.arange(distances.shape[0], device=distances.device)
        worst = distances.argmax(dim=1)  # [B]
        top = distances[batch, worst]  # [B] s*
        if self.num_neighbours == 0:
            return top
        matched = self.memory_bank[indices[batch, worst]]  # [B, C] m*
        b = min(self.num_neighbours, len(self.memory_bank))
        _, support = nearest_neighbours(matched, self.memory_bank, k=b)  # [B, b]
        test_patch = features[batch, worst]  # [B, C] m_test*
        to_support = torch.linalg.vector_norm(self.memory_bank[support] - test_patch[:, None], dim=-1)  # [B, b]
        weight = 1 - torch.exp(top - torch.logsumexp(to_support, dim=1))
        return weight * top

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (anomaly maps [B, 1, S, S], scores [B])."""
        features, distances, indices = self(images)
        with torch.autocast(images.device.type, enabled=False):
            return self.anomaly_map(distances), self.score(distances, indices, features)
