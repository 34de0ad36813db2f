"""Every file of every config group composes and instantiates; typos fail naming what is valid."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from anomcli.cli import check_overrides, config_dir
from anomcli.data.datamodule import CoilsDataModule, FolderDataModule
from anomcli.model import Dinomaly

from .helpers import compose_task, run_cli

ENCODERS = sorted(p.stem for p in (config_dir() / "model" / "encoder").glob("*.yaml"))
DECODERS = sorted(p.stem for p in (config_dir() / "model" / "decoder").glob("*.yaml"))
DATA = sorted(p.stem for p in (config_dir() / "data").glob("*.yaml"))
TASKS = ["train", "validate", "threshold", "infer"]


def test_required_groups_and_options_exist():
    assert {"dinov2_vits14_reg4", "dinov2_vitb14_reg4", "efficientnet_lite0", "tiny"} <= set(ENCODERS)
    assert {"linear_attention", "softmax_attention"} <= set(DECODERS)
    assert {"coils", "mtd", "folder"} <= set(DATA)


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_compose(task):
    overrides = [] if task == "train" else ["ckpt=x"] + (["input=y"] if task == "infer" else [])
    cfg = compose_task(task, overrides)
    assert cfg.task_name == task


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_builds_a_dinomaly_model(encoder):
    cfg = compose_task("train", [f"model/encoder={encoder}"])
    with open_dict(cfg):
        if encoder.startswith("dinov2"):
            cfg.model.encoder.pretrained = False  # no DINOv2 weights offline; the architecture is what is checked
            cfg.model.encoder.input_size = 56
    model = instantiate(cfg.model)
    assert isinstance(model, Dinomaly)
    assert len(model.encoder.taps) == 8 and len(model.decoder.blocks) == 8


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_builds(decoder):
    cfg = compose_task("train", ["model/encoder=tiny", f"model/decoder={decoder}"])
    assert isinstance(instantiate(cfg.model), Dinomaly)


@pytest.mark.parametrize("data", [d for d in DATA if d != "from_checkpoint"])
def test_every_data_config_instantiates(data, tmp_path):
    cfg = compose_task("train", [f"data={data}", f"data.root={tmp_path}"])
    module = instantiate(cfg.data)
    assert isinstance(module, CoilsDataModule if data == "coils" else FolderDataModule)


def test_experiments_compose():
    for experiment in sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")):
        cfg = compose_task("train", [f"experiment={experiment}"])
        assert cfg.trainer.max_steps > 0


def test_model_defaults_follow_the_paper():
    cfg = compose_task("train")
    assert cfg.model.encoder.model_name == "vit_small_patch14_reg4_dinov2.lvd142m"
    assert list(cfg.model.encoder.taps) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert cfg.model.encoder.input_size % 14 == 0
    assert cfg.model.bottleneck.dropout == 0.2 and cfg.model.decoder.attention == "linear"
    assert (cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.grad_clip) == (2e-3, 1e-4, 0.1)
    assert cfg.data.batch_size == 16


def test_misspelt_key_names_the_valid_keys():
    problem = check_overrides("train", ["trainer.max_stepz=3"])
    assert "trainer.max_steps" in problem and "valid keys of 'trainer'" in problem


def test_misspelt_group_option_names_the_choices():
    problem = check_overrides("train", ["model/encoder=tiy"])
    assert "Available options" in problem and "efficientnet_lite0" in problem


def test_wrong_type_fails_before_work():
    assert "could not be converted" in check_overrides("train", ["trainer.max_steps=abc"])


def test_sweeps_are_checked_by_their_first_value():
    assert check_overrides("train", ["model.bottleneck.dropout=0.2,0.3", "trainer.max_steps=5"]) is None


def test_every_model_config_builds():
    from anomcli.model import VAE, GANomaly, PatchCore

    expected = {"dinomaly": Dinomaly, "patchcore": PatchCore, "vae": VAE, "gan": GANomaly}
    trained_from_scratch = {"vae", "gan"}  # no frozen encoder: a small input keeps the test fast
    for model in sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")):
        small = (["model.input_size=32"] if model in trained_from_scratch
                 else ["model.encoder.pretrained=false", "model.encoder.input_size=56"])
        cfg = compose_task("train", [f"model={model}", *small])
        assert isinstance(instantiate(cfg.model), expected[model]), model


@pytest.mark.parametrize("task, override, key", [
    ("threshold", "target_recall=abc", "target_recall"),
    ("threshold", "synthetic.per_image=many", "synthetic.per_image"),
    ("validate", "false_positives.enabled=maybe", "false_positives.enabled"),
])
def test_task_settings_of_the_wrong_type_fail_before_any_work(task, override, key):
    result = run_cli(task, "ckpt=does/not/matter", override, check=False)
    assert result.returncode == 2 and key in result.stderr and "Traceback" not in result.stderr
