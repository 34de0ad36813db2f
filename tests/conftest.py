"""Shared fixtures: task configs composed once and shrunk for the CPU, a tiny generated dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from anomcli.data.coils import generate_coils

from .helpers import TINY_DATA, compose_task, tiny_data_overrides


@pytest.fixture(scope="session")
def tiny_coils(tmp_path_factory) -> Path:
    """A small coils dataset in the MVTec layout (generated once per test session)."""
    root = tmp_path_factory.mktemp("data") / "coils"
    return generate_coils(root, seed=0, **TINY_DATA)


@pytest.fixture
def train_cfg(tiny_coils, tmp_path) -> DictConfig:
    cfg = compose_task("train", ["model/encoder=tiny", "trainer.max_steps=6", "trainer.warmup_steps=2",
                                 "trainer.save_every=4", "trainer.stats_images=8", "trainer.device=cpu",
                                 *tiny_data_overrides(tiny_coils)])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train")
    return cfg
