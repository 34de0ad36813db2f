"""PatchCore: the greedy coreset, nearest-neighbour search, checkpoints, and that it finds defects."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from anomcli.data.coils import DEFECT_TYPES, add_defect, render_surface
from anomcli.model.encoder import CNNEncoder, ViTEncoder
from anomcli.model import patchcore
from anomcli.model.patchcore import PatchCore, greedy_coreset

from .helpers import compose_task


@pytest.fixture(scope="module")
def lite0() -> CNNEncoder:
    """A random-weight EfficientNet-Lite0 encoder, 64 px in, 8x8 patches of 2 x 112 channels out."""
    torch.manual_seed(0)
    return CNNEncoder("tf_efficientnet_lite0", taps=[4, 10], input_size=64, grid_stride=8, pretrained=False)


def grey_batch(images: list[np.ndarray]) -> torch.Tensor:
    """[H, W] grey images in [0, 1] -> [B, 3, H, W], as the loaders feed them."""
    return torch.from_numpy(np.stack(images))[:, None].repeat(1, 3, 1, 1)


def plain_farthest_points(points: torch.Tensor, count: int, first: int) -> list[int]:
    """The textbook k-center greedy: one pass over every point per pick."""
    picked = [first]
    nearest = (points - points[first]).square().sum(dim=1)
    while len(picked) < count:
        picked.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (points - points[picked[-1]]).square().sum(dim=1))
    return picked


# --- coreset --------------------------------------------------------------------

@pytest.mark.parametrize("projection_dim", [0, 16])
def test_coreset_picks_one_point_per_tight_cluster(projection_dim):
    generator = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(6, 64)  # 6 clusters, pairwise 14 apart
    points = centres.repeat_interleave(50, dim=0) + 0.01 * torch.randn(300, 64, generator=generator)
    picked = greedy_coreset(points, 6, projection_dim=projection_dim)
    assert sorted((picked // 50).tolist()) == [0, 1, 2, 3, 4, 5]


def test_coreset_matches_the_textbook_algorithm_across_refreshes(monkeypatch):
    monkeypatch.setattr(patchcore, "CANDIDATE_POOL", 8)  # many refreshes ...
    monkeypatch.setattr(patchcore, "UPDATE_BATCH", 32)  # ... each bringing only some rows up to date
    points = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    picked = greedy_coreset(points, 60, projection_dim=0, seed=3).tolist()
    assert picked == plain_farthest_points(points, 60, first=picked[0])
    assert len(set(picked)) == 60


def test_coreset_can_pick_every_point_even_duplicates():
    points = torch.cat([torch.zeros(5, 3), torch.ones(5, 3)])
    assert sorted(greedy_coreset(points, 10, projection_dim=0).tolist()) == list(range(10))


@pytest.mark.parametrize("ratio, bank_rows", [(1.0, 128), (0.1, 12)])
def test_coreset_ratio_sets_the_bank_size(ratio, bank_rows, lite0):
    model = PatchCore(lite0, coreset_ratio=ratio)
    images = torch.rand(2, 3, 64, 64)
    model.fit([images])
    features = model.encode(images).flatten(0, 1)  # [2 * 8 * 8, C]
    assert model.memory_bank.shape == (bank_rows, 224)  # int(128 * ratio) rows
    if ratio == 1:  # every patch, as encoded
        torch.testing.assert_close(model.memory_bank, features)


# --- nearest neighbours and scoring ------------------------------------------------

def test_patch_distances_agree_with_brute_force(monkeypatch, lite0):
    monkeypatch.setattr(patchcore, "QUERY_BLOCK", 50)
    monkeypatch.setattr(patchcore, "PAIRWISE_BLOCK", 1000)  # 50 queries x 20 bank rows at a time
    model = PatchCore(lite0)
    model.memory_bank = torch.randn(310, 224)
    features = torch.randn(2, 64, 224)
    distances, indices = model.patch_distances(features)
    expected = torch.cdist(features.flatten(0, 1), model.memory_bank).min(dim=1)
    torch.testing.assert_close(distances, expected.values.view(2, 64))
    assert torch.equal(indices, expected.indices.view(2, 64))

    nearest_five = patchcore.nearest_neighbours(features[0], model.memory_bank, k=5)
    expected_five = torch.cdist(features[0], model.memory_bank).topk(5, dim=1, largest=False)
    torch.testing.assert_close(nearest_five[0], expected_five.values)
    assert torch.equal(nearest_five[1], expected_five.indices)


def test_score_is_the_largest_patch_distance_and_reweighting_only_lowers_it(lite0):
    plain = PatchCore(lite0, num_neighbours=0)
    reweighted = PatchCore(lite0, num_neighbours=9)
    plain.memory_bank = reweighted.memory_bank = torch.randn(50, 224)
    features = torch.randn(2, 64, 224)
    distances, indices = plain.patch_distances(features)
    torch.testing.assert_close(plain.score(distances, indices, features), distances.amax(dim=1))
    weighted = reweighted.score(distances, indices, features)
    assert torch.all(weighted > 0) and torch.all(weighted <= distances.amax(dim=1))


def test_prefix_tokens_are_dropped_and_maps_have_the_input_size():
    torch.manual_seed(0)
    vit = ViTEncoder("vit_small_patch14_reg4_dinov2", taps=[3, 7], input_size=56, pretrained=False,
                     model_kwargs=dict(embed_dim=32, depth=8, num_heads=2))
    model = PatchCore(vit, coreset_ratio=0.5)
    images = torch.rand(2, 3, 56, 56)
    assert model.encode(images).shape == (2, 16, 64)  # 4x4 patches; class + 4 registers gone
    model.fit([images])
    maps, scores = model.predict(images)
    assert maps.shape == (2, 1, 56, 56) and scores.shape == (2,)


# --- lifecycle ---------------------------------------------------------------------

def test_predict_before_fit_raises(lite0):
    with pytest.raises(RuntimeError, match="no memory bank: train it first"):
        PatchCore(lite0).predict(torch.rand(1, 3, 64, 64))


def test_checkpoint_round_trip_resizes_the_bank(tmp_path, lite0):
    model = PatchCore(lite0, coreset_ratio=0.25)
    model.fit([torch.rand(4, 3, 64, 64)])
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))

    fresh = PatchCore(copy.deepcopy(lite0), coreset_ratio=0.25)
    for tensor in fresh.state_dict().values():
        tensor.zero_()  # everything must come from the file
    assert fresh.memory_bank.shape == (0, 224)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert fresh.memory_bank.shape == (64, 224)

    images = torch.rand(2, 3, 64, 64)
    maps, scores = model.eval().predict(images)
    fresh_maps, fresh_scores = fresh.train().predict(images)  # same outputs in either mode
    assert torch.equal(maps, fresh_maps) and torch.equal(scores, fresh_scores)
    assert not fresh.encoder.training


def test_patchcore_configs_instantiate():
    model = instantiate(compose_task("train", ["model=patchcore"]).model)
    assert isinstance(model, PatchCore) and model.encoder.taps == [4, 10]
    assert model.memory_bank.shape == (0, 224) and model.input_size == 256
    tiny = compose_task("train", ["model=patchcore", "model/encoder=tiny", "model.encoder.taps=[2,9]"])
    assert isinstance(instantiate(tiny.model), PatchCore)


# --- it finds defects --------------------------------------------------------------

def test_patchcore_ranks_defective_coils_above_good_ones():
    size = 128
    rng = np.random.default_rng(0)
    train = grey_batch([render_surface(rng, size, size) for _ in range(12)])
    good = [render_surface(rng, size, size) for _ in range(6)]
    defective = [add_defect(render_surface(rng, size, size), kind, rng)[0] for kind in DEFECT_TYPES]

    encoder = CNNEncoder("tf_efficientnet_lite0", taps=[4, 10], input_size=size, grid_stride=8, pretrained=True)
    model = PatchCore(encoder, coreset_ratio=0.1)
    model.fit(train.split(6))
    maps, scores = model.predict(grey_batch(good + defective))

    assert maps.shape == (12, 1, size, size)
    assert roc_auc_score([0] * 6 + [1] * 6, scores.numpy()) >= 0.9


def test_a_trained_patchcore_checkpoint_loads_with_its_bank(tiny_coils, tmp_path):
    from omegaconf import open_dict

    from anomcli.engine.checkpoint import load_checkpoint
    from anomcli.tasks import train

    from .helpers import tiny_data_overrides

    cfg = compose_task("train", ["model=patchcore", "model/encoder=tiny", "model.encoder.taps=[2,9]",
                                 "trainer.stats_images=2", "trainer.device=cpu", *tiny_data_overrides(tiny_coils)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    checkpoint = load_checkpoint(train.run(cfg)["checkpoint"])
    assert checkpoint.model.memory_bank.shape[0] > 0
