"""torchrun: 2 CPU processes over gloo train one model and share out inference; merging loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from anomcli import cli
from anomcli.engine import distributed
from anomcli.engine.checkpoint import load_checkpoint

from .helpers import REPO, run_cli, tiny_data_overrides

TRAIN = ["model/encoder=tiny", "trainer.max_steps=4", "trainer.warmup_steps=2", "trainer.save_every=2",
         "trainer.stats_images=4", "trainer.device=cpu"]


def torchrun(*args: str, cwd, processes: int = 2, program: tuple[str, ...] = ("-m", "anomcli")
             ) -> subprocess.CompletedProcess:
    """`torchrun <program> <args>` (by default `anom`), raising with its output when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [*program, *args]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", *command],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(command)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
    return result


def test_shards_cover_every_item_once(monkeypatch):
    items = list(range(23))
    shards = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shards.append(distributed.shard(items))
    assert sorted(sum(shards, [])) == items and all(len(s) in (7, 8) for s in shards)


def test_processes_share_each_training_epoch_without_overlap():
    from anomcli.data.datamodule import ShuffledBatches

    for epoch in range(3):
        shares = [ShuffledBatches(10, 2, seed=5, rank=r, world_size=2).epoch_order(epoch) for r in range(2)]
        assert sorted(shares[0] + shares[1]) == list(range(10))
    first = ShuffledBatches(10, 2, seed=5, rank=1, world_size=2)
    stream = iter(first)
    drawn = [next(stream) for _ in range(4)]  # two batches per epoch (5 images, batch 2)
    assert drawn[:2] == [first.epoch_order(0)[0:2], first.epoch_order(0)[2:4]]
    assert drawn[2:] == [first.epoch_order(1)[0:2], first.epoch_order(1)[2:4]]


def test_merge_keeps_input_order_and_refuses_lost_or_doubled_records(tmp_path):
    path = tmp_path / "predictions.jsonl"
    order = ["a", "b", "c", "d"]

    def part(*names):
        return [json.dumps({"path": n, "score": i}) for i, n in enumerate(names)]

    assert distributed.write_merged(path, [part("a", "c"), part("b", "d")], order) == 4
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == order
    with pytest.raises(RuntimeError, match="more than one process"):
        distributed.write_merged(path, [part("a", "c"), part("b", "c", "d")], order)
    with pytest.raises(RuntimeError, match="1 inputs missing"):
        distributed.write_merged(path, [part("a"), part("b", "d")], order)
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == order  # left as it was


def test_only_train_and_infer_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["validate", "ckpt=x"]) == cli.EXIT_USAGE
    assert "torchrun runs only" in capsys.readouterr().err


GROUP_LIFETIME_SCRIPT = """
import os
from anomcli.engine import distributed
distributed.init_process_group()
import timm  # as the tasks do; it imports torch.distributed.nn, whose functions' default group= could hold the group
distributed.barrier()
distributed.shutdown()
threads = len(os.listdir("/proc/self/task"))
assert threads == 1, f"{threads} threads after shutdown: the process group was not freed"
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_shutdown_frees_the_process_group_and_its_threads(tmp_path):
    # gloo threads left running abort the interpreter at exit, now and then (SIGABRT)
    script = tmp_path / "group_lifetime.py"
    script.write_text(GROUP_LIFETIME_SCRIPT)
    torchrun(cwd=tmp_path, program=(str(script),))  # raises unless both processes exit 0


def test_torchrun_trains_and_shares_out_inference(tiny_coils, tmp_path):
    # train: no hydra.run.dir, so both processes must agree on rank 0's timestamped run folder
    torchrun("train", *TRAIN, *tiny_data_overrides(tiny_coils), f"paths.log_dir={tmp_path / 'runs'}", cwd=tmp_path)
    runs = list((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1, runs
    checkpoint = load_checkpoint(runs[0] / "checkpoint")
    assert checkpoint.meta["trainer_step"] == 4
    assert checkpoint.meta["world_size"] == 2 and checkpoint.meta["effective_batch_size"] == 8
    assert "effective batch 8" in (runs[0] / "train.log").read_text()
    # the other training path: images through the encoder every step, each process its share of an epoch
    torchrun("train", *TRAIN, "trainer.max_steps=2", "trainer.cache_encoder=false", *tiny_data_overrides(tiny_coils),
             f"hydra.run.dir={tmp_path / 'uncached'}", cwd=tmp_path)
    assert load_checkpoint(tmp_path / "uncached" / "checkpoint").meta["trainer_step"] == 2

    # infer: every file scored by exactly one process, one predictions file, the single-process scores
    inputs = tmp_path / "in"
    shutil.copytree(tiny_coils / "test", inputs)
    (inputs / "broken.png").write_bytes(b"not an image")
    ckpt = f"ckpt={runs[0] / 'checkpoint'}"
    torchrun("infer", ckpt, f"input={inputs}", "heatmaps=all", "threshold=0", f"hydra.run.dir={tmp_path / 'i2'}",
             cwd=tmp_path)
    run_cli("infer", ckpt, f"input={inputs}", "heatmaps=none", f"hydra.run.dir={tmp_path / 'i1'}")
    shared = [json.loads(line) for line in (tmp_path / "i2" / "predictions.jsonl").read_text().splitlines()]
    alone = {r["path"]: r for r in map(json.loads, (tmp_path / "i1" / "predictions.jsonl").read_text().splitlines())}
    assert len(shared) == len(alone) == 19 and len({r["path"] for r in shared}) == 19
    assert {r["path"] for r in shared} == set(alone)
    for record in shared:
        if record["path"].endswith("broken.png"):
            assert record["score"] is None and record["error"]
        else:
            assert record["score"] == pytest.approx(alone[record["path"]]["score"], abs=1e-6)
            assert os.path.isfile(record["heatmap"])  # written by whichever process scored it
    assert sorted(p.name for p in (tmp_path / "i2").glob("predictions*")) == ["predictions.jsonl"]
