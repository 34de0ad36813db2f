"""Training through `run(cfg)`: checkpoint contents, loss going down, resume, fine-tune, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from anomcli.engine.checkpoint import CheckpointError, atomic_write_json, load_checkpoint
from anomcli.tasks import train


def test_train_writes_a_complete_checkpoint(train_cfg):
    result = train.run(train_cfg)
    folder = result["checkpoint"]
    checkpoint = load_checkpoint(folder)
    meta = checkpoint.meta
    assert meta["trainer_step"] == 6 and meta["input_size"] == 56 and meta["encoder_pretrained"] is False
    assert meta["torch_version"] == torch.__version__ and "anomcli_version" in meta
    assert meta["train_statistics"]["images"] == 8
    scale = meta["train_statistics"]["map_scale"]
    assert scale["high"] > scale["low"]
    # the checkpoint holds every weight, the frozen encoder's too, and rebuilds the same model
    weights = load_file(f"{folder}/model.safetensors")
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("decoder.") for k in weights)
    images = torch.rand(2, 3, 56, 56)
    checkpoint.model.eval()
    maps_a, scores_a = checkpoint.model.predict(images)
    maps_b, scores_b = load_checkpoint(folder).model.predict(images)
    torch.testing.assert_close(scores_a, scores_b)
    assert checkpoint.config.model.encoder.model_name == "vit_small_patch14_reg4_dinov2"


def test_loss_decreases(train_cfg):
    with open_dict(train_cfg):
        train_cfg.trainer.max_steps = 40
        train_cfg.trainer.log_every = 1
    first = train.run(train_cfg)
    assert first["final_loss"] < 0.9  # random decoder output starts near cosine distance 1


def test_resume_continues_from_the_saved_step(train_cfg, tmp_path):
    with open_dict(train_cfg):
        train_cfg.trainer.max_steps = 4
    train.run(train_cfg)
    with open_dict(train_cfg):
        train_cfg.trainer.max_steps = 8
        train_cfg.trainer.resume = True
    result = train.run(train_cfg)
    assert result["steps"] == 8
    state = json.loads((tmp_path / "train" / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 8


def test_resume_without_a_checkpoint_says_what_to_do(train_cfg):
    with open_dict(train_cfg):
        train_cfg.trainer.resume = True
    with pytest.raises(ValueError, match="hydra.run.dir"):
        train.run(train_cfg)


def test_fine_tune_starts_from_checkpoint_weights(train_cfg, tmp_path):
    source = train.run(train_cfg)["checkpoint"]
    with open_dict(train_cfg):
        train_cfg.ckpt = source
        train_cfg.paths.output_dir = str(tmp_path / "fine-tune")
        train_cfg.trainer.max_steps = 2
    result = train.run(train_cfg)
    assert load_checkpoint(result["checkpoint"]).meta["trainer_step"] == 2


def test_incomplete_or_foreign_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "partial")


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary file left behind


@pytest.mark.parametrize("experiment", ["coils_demo"])
def test_experiments_train_briefly(experiment, tiny_coils, tmp_path):
    from .helpers import compose_task, tiny_data_overrides

    cfg = compose_task("train", [f"experiment={experiment}", "trainer.max_steps=2", "trainer.stats_images=2",
                                 "trainer.device=cpu", *tiny_data_overrides(tiny_coils)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert load_checkpoint(train.run(cfg)["checkpoint"]).meta["trainer_step"] == 2


def _fit_steps(model, batches, tmp_path, steps=3):
    from anomcli.engine.fit import fit
    from omegaconf import OmegaConf
    from anomcli.config import TrainerConfig

    trainer = OmegaConf.structured(TrainerConfig(max_steps=steps, warmup_steps=1, save_every=100))
    folder = tmp_path / "checkpoint"
    folder.mkdir(parents=True)
    fit(model, batches, trainer, device=torch.device("cpu"), save=lambda step, *training_state: folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_on_cached_taps_equals_training_on_images(train_cfg, tmp_path):
    from hydra.utils import instantiate

    torch.manual_seed(0)
    model = instantiate(train_cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 3, 56, 56)

    def image_batches():
        while True:
            yield {"images": images}

    def tap_batches():
        taps = model.encode(images)
        while True:
            yield {"taps": taps}

    torch.manual_seed(1)  # the bottleneck's dropout draws the same masks in both runs
    from_images = _fit_steps(model, image_batches(), tmp_path / "a")
    model.load_state_dict(initial)
    torch.manual_seed(1)
    from_taps = _fit_steps(model, tap_batches(), tmp_path / "b")
    assert any(not torch.equal(initial[k], from_images[k]) for k in initial)  # it did train
    for name in from_images:
        torch.testing.assert_close(from_taps[name], from_images[name])


def test_encoder_cache_covers_every_image_once_per_epoch_and_respects_its_limit(train_cfg, tiny_coils):
    from hydra.utils import instantiate
    from anomcli.engine.feature_cache import encode_training_set, endless_tap_batches

    model = instantiate(train_cfg.model)
    datamodule = instantiate(train_cfg.data)
    datamodule.prepare()
    samples = datamodule.train_samples()
    loader = datamodule.loader(samples, model.input_size, batch_size=3)
    taps = encode_training_set(model, loader, device=torch.device("cpu"), max_gib=1.0)
    assert len(taps) == len(model.encoder.taps) and taps[0].shape[0] == len(samples)
    first = next(iter(loader))["images"][:1]
    torch.testing.assert_close(taps[-1][:1], model.encode(first)[-1])
    # one epoch of shuffled batches holds each image once
    marked = [torch.arange(len(samples), dtype=torch.float32).view(-1, 1, 1)]
    batches = endless_tap_batches(marked, batch_size=2, seed=0)
    seen = torch.cat([next(batches)["taps"][0].flatten() for _ in range(len(samples) // 2)])
    assert len(seen) == len(samples) // 2 * 2 and len(set(seen.tolist())) == len(seen)
    assert encode_training_set(model, loader, device=torch.device("cpu"), max_gib=1e-9) is None
