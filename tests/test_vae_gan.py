"""VAE and GANomaly: their maths, the model-owned training step, and the same outputs as Dinomaly's."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image

from anomcli.engine.checkpoint import load_checkpoint
from anomcli.model.encoder import CNNEncoder
from anomcli.model.gan import GANomaly
from anomcli.model.layers import DCGANDecoder, DCGANEncoder, pyramid_widths
from anomcli.model.losses import kl_to_standard_normal
from anomcli.model.vae import VAE
from anomcli.tasks import train

from .helpers import compose_task, run_cli, tiny_data_overrides

# a 32-px model with narrow stages: a few CPU steps take seconds
TINY_MODEL = ["model.input_size=32", "model.width=8", "model.max_width=32", "model.latent_dim=16"]
TINY_TRAINER = ["trainer.warmup_steps=2", "trainer.save_every=4", "trainer.stats_images=8", "trainer.device=cpu",
                "trainer.lr=2e-3"]
MODELS = ["vae", "gan"]


def tiny_train_cfg(model: str, data_root, out, steps: int, extra: list[str] = ()):
    cfg = compose_task("train", [f"model={model}", *TINY_MODEL, *TINY_TRAINER, f"trainer.max_steps={steps}",
                                 *tiny_data_overrides(data_root), *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


# --- building blocks --------------------------------------------------------------

def test_dcgan_stacks_halve_down_to_four_and_mirror_back():
    assert pyramid_widths(256, 16, 128) == [16, 32, 64, 128, 128, 128]  # 256 -> 4 in six stages
    encoder = DCGANEncoder(64, 3, 10, width=8, max_width=32)
    decoder = DCGANDecoder(64, 10, 3, width=8, max_width=32)
    images = torch.rand(2, 3, 64, 64)
    assert encoder.features(images).shape == (2, 32, 4, 4)
    z = encoder(images)
    assert z.shape == (2, 10)
    out = decoder(z)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="power of two"):
        pyramid_widths(56, 8, 32)


def test_kl_matches_torch_distributions():
    mean, log_var = torch.randn(4, 7), torch.randn(4, 7)
    posterior = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros(7), torch.ones(7))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(dim=1).mean()
    torch.testing.assert_close(kl_to_standard_normal(mean, log_var), expected)
    assert kl_to_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)) == 0


# --- VAE ------------------------------------------------------------------------

def test_vae_loss_terms_and_deterministic_prediction():
    torch.manual_seed(0)
    model = VAE(input_size=32, latent_dim=8, width=8, max_width=32, beta=0.0).eval()
    images = torch.rand(3, 3, 32, 32)
    reconstruction, mean, log_var = model(images)
    assert reconstruction.shape == images.shape and 0 <= reconstruction.min() and reconstruction.max() <= 1
    terms = model.losses(images, reconstruction, mean, log_var)
    torch.testing.assert_close(terms["loss"], terms["pixel"])  # beta 0: the KL term is off
    torch.testing.assert_close(terms["pixel"], (images - reconstruction).square().mean())
    maps, scores = model.predict(images)
    assert maps.shape == (3, 1, 32, 32) and scores.shape == (3,)
    again_maps, again_scores = model.predict(images)  # inference uses the mean code: no sampling noise
    assert torch.equal(maps, again_maps) and torch.equal(scores, again_scores)
    # the score is the mean of the top 1 % of the map's pixels (10 of 1024)
    torch.testing.assert_close(scores, maps.flatten(1).topk(10, dim=1).values.mean(dim=1))


def test_vae_feature_term_needs_an_encoder_and_uses_it():
    with pytest.raises(ValueError, match="needs a frozen encoder"):
        VAE(input_size=32, feature_weight=1.0)
    encoder = CNNEncoder("tf_efficientnet_lite0", taps=[3, 4], input_size=32, grid_stride=8, pretrained=False)
    with pytest.raises(ValueError, match="feature_weight is 0"):
        VAE(input_size=32, encoder=encoder)
    model = VAE(input_size=32, width=8, max_width=32, encoder=encoder, feature_weight=2.0).train()
    assert not model.encoder.training  # frozen, even in training mode
    images = torch.rand(2, 3, 32, 32)
    reconstruction, mean, log_var = model(images)
    terms = model.losses(images, reconstruction, mean, log_var)
    assert terms["features"] > 0
    torch.testing.assert_close(terms["loss"], terms["pixel"] + terms["kl"] + 2.0 * terms["features"])
    # the frozen encoder is never trained
    assert all(p not in set(model.parameter_groups()["vae"]) for p in model.encoder.parameters())


# --- GANomaly ---------------------------------------------------------------------

def test_ganomaly_scores_the_code_distance_and_maps_the_reconstruction_error():
    torch.manual_seed(0)
    model = GANomaly(input_size=32, latent_dim=8, width=8, max_width=32, map_sigma=0.0001).eval()
    images = torch.rand(2, 3, 32, 32)
    z, reconstruction, z_hat = model(images)
    assert z.shape == z_hat.shape == (2, 8) and reconstruction.shape == (2, 3, 32, 32)
    maps, scores = model.predict(images)
    torch.testing.assert_close(scores, (z - z_hat).square().mean(dim=1))
    error = (images - (reconstruction + 1) / 2).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(maps, error)  # a vanishing blur leaves the error itself


def test_ganomaly_updates_touch_only_their_own_group():
    torch.manual_seed(0)
    model = GANomaly(input_size=32, latent_dim=8, width=8, max_width=32).train()
    groups = model.parameter_groups()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g) for g in groups.values()) == len(trainable)  # every weight in exactly one group
    assert len({id(p) for g in groups.values() for p in g}) == len(trainable)
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    moved = []

    def update(name, loss):  # as the engine does: gradients into one group only, then a step
        for params in groups.values():
            for p in params:
                p.grad = None
        loss.backward(inputs=groups[name])
        changed = {other: any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
                   for other, params in groups.items()}
        moved.append((name, changed))
        with torch.no_grad():
            for p in groups[name]:
                p -= 0.1 * p.grad

    terms = model.training_step(torch.rand(4, 3, 32, 32), update)
    assert [name for name, _ in moved] == ["generator", "discriminator"]
    assert moved[0][1] == {"generator": True, "discriminator": False}
    assert moved[1][1] == {"generator": False, "discriminator": True}
    assert set(terms) == {"loss", "adversarial", "contextual", "latent", "discriminator"}
    assert all(not torch.equal(a, b) for a, b in zip(before["generator"], groups["generator"]))


# --- training through run(cfg) ------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_training_lowers_the_loss_and_checkpoints_round_trip(model, tiny_coils, tmp_path):
    one = train.run(tiny_train_cfg(model, tiny_coils, tmp_path / "one", steps=1))
    many = train.run(tiny_train_cfg(model, tiny_coils, tmp_path / "many", steps=30))
    # same seed, same first batch: step 1's loss is where the longer run started
    assert many["final_loss"] < 0.8 * one["final_loss"]

    checkpoint = load_checkpoint(many["checkpoint"])
    meta = checkpoint.meta
    assert meta["model"] == {"vae": "vae", "gan": "ganomaly"}[model]
    assert meta["trainer_step"] == 30 and meta["input_size"] == 32
    assert "encoder_pretrained" not in meta  # trained from scratch: nothing random to warn about
    assert meta["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert meta["train_statistics"]["map_scale"]["high"] > meta["train_statistics"]["map_scale"]["low"]
    images = torch.rand(2, 3, 32, 32)
    maps, scores = checkpoint.model.predict(images)
    again_maps, again_scores = load_checkpoint(many["checkpoint"]).model.predict(images)
    torch.testing.assert_close(maps, again_maps)
    torch.testing.assert_close(scores, again_scores)
    # the optimiser state holds one param group per update the model makes
    state = json.loads((tmp_path / "many" / "checkpoint" / "training_state.json").read_text())
    assert [g["name"] for g in state["param_groups"]] == {"vae": ["vae"], "gan": ["generator", "discriminator"]}[model]


@pytest.mark.parametrize("model", MODELS)
def test_resume_continues_the_model_owned_loop(model, tiny_coils, tmp_path):
    train.run(tiny_train_cfg(model, tiny_coils, tmp_path, steps=4))
    result = train.run(tiny_train_cfg(model, tiny_coils, tmp_path, steps=6, extra=["trainer.resume=true"]))
    assert result["steps"] == 6
    assert json.loads((tmp_path / "checkpoint" / "training_state.json").read_text())["step"] == 6


def test_vae_trains_with_the_feature_space_term(tiny_coils, tmp_path):
    cfg = tiny_train_cfg("vae", tiny_coils, tmp_path, steps=2,
                         extra=["model/encoder=efficientnet_lite0", "model.encoder.pretrained=false",
                                "model.encoder.input_size=32", "model.encoder.taps=[3,4]", "model.feature_weight=1"])
    checkpoint = load_checkpoint(train.run(cfg)["checkpoint"])
    assert checkpoint.meta["encoder_pretrained"] is False
    assert checkpoint.model.encoder is not None and checkpoint.model.feature_weight == 1


# --- configs ---------------------------------------------------------------------

def test_models_bring_their_training_recipe_unless_told_otherwise():
    vae, gan = compose_task("train", ["model=vae"]), compose_task("train", ["model=gan"])
    assert isinstance(instantiate(vae.model), VAE) and vae.trainer.lr == 1e-3
    assert isinstance(instantiate(gan.model), GANomaly)
    assert gan.trainer.lr == 2e-4 and list(gan.trainer.betas) == [0.5, 0.999]
    assert compose_task("train", ["model=gan", "trainer=default"]).trainer.lr == 2e-3
    assert compose_task("train").trainer.lr == 2e-3  # Dinomaly keeps its own
    for experiment, target in (("mtd_vae", VAE), ("mtd_gan", GANomaly)):
        cfg = compose_task("train", [f"experiment={experiment}"])
        assert isinstance(instantiate(cfg.model), target) and cfg.model.input_size == 256


# --- the CLI: same outputs as Dinomaly's ---------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_cli_train_threshold_validate_infer(model, tiny_coils, tmp_path):
    run_cli("train", f"model={model}", *TINY_MODEL, *TINY_TRAINER, "trainer.max_steps=4",
            *tiny_data_overrides(tiny_coils), f"hydra.run.dir={tmp_path / 'train'}")
    ckpt = tmp_path / "train" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "config.yaml", "meta.json",
                                                "training_state.safetensors", "training_state.json"}

    run_cli("threshold", f"ckpt={ckpt}", "target_recall=0.9", f"hydra.run.dir={tmp_path / 't'}")
    threshold = json.loads((ckpt / "threshold.json").read_text())
    assert threshold["achieved"]["recall"] >= 0.9

    run_cli("validate", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'v'}")
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert set(metrics["image"]) == {"auroc", "ap", "f1_max", "fpr_at_95_recall"}
    assert set(metrics["pixel"]) == {"auroc", "ap", "f1_max", "aupro"}
    assert metrics["counts"]["good"] == 6 and metrics["counts"]["defective"] == 12
    assert metrics["operating_point"]["threshold"] == pytest.approx(threshold["threshold"])
    with open(tmp_path / "v" / "scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 18
    assert Image.open(tmp_path / "v" / "heatmaps" / "scratch" / "000.png").size == (96, 64)  # original size
    # flagged good images are listed; with no frozen encoder, no feature distance is claimed for them
    report = json.loads((tmp_path / "v" / "false_positives" / "report.json").read_text())
    assert len(report["flagged"]) == report["n_flagged"]
    assert all(entry["nearest_train_distance"] is None for entry in report["flagged"])

    run_cli("infer", f"ckpt={ckpt}", f"input={tiny_coils / 'test'}", "heatmaps=all",
            f"hydra.run.dir={tmp_path / 'i'}")
    lines = [json.loads(line) for line in (tmp_path / "i" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and all(set(line) >= {"path", "score", "is_anomalous", "threshold", "heatmap"}
                                    for line in lines)
    assert all(line["is_anomalous"] == (line["score"] >= line["threshold"]) for line in lines)
    assert (tmp_path / "i" / "heatmaps" / "dent" / "000.png").is_file()


def test_cli_bad_model_arguments_are_a_usage_error(tiny_coils, tmp_path):
    result = run_cli("train", "model=vae", *TINY_MODEL, "model.feature_weight=1", *tiny_data_overrides(tiny_coils),
                     f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert result.returncode == 2 and "needs a frozen encoder" in result.stderr
    assert "Traceback" not in result.stderr
