"""Helpers the tests share: compose a task config, run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from anomcli.cli import config_dir
from anomcli.config import register_schemas

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = {"n_train": 12, "n_test_good": 6, "n_test_per_defect": 2, "height": 64, "width": 96}


def compose_task(task: str, overrides: list[str] | None = None) -> DictConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=task, overrides=overrides or [])


def tiny_data_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.num_workers=0", "data.batch_size=4",
            *(f"data.{k}={v}" for k, v in TINY_DATA.items())]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m anomcli ...` as a user would, without network access to the hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "anomcli", *args], cwd=cwd or REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"anom {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result
