"""Several processes under `torchrun`: one process group, rank 0 writes, inputs split without overlap.

    torchrun --nproc_per_node=N -m anomcli train ...   data-parallel training (DistributedDataParallel)
    torchrun --nproc_per_node=N -m anomcli infer ...   the input files shared out, one predictions file

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (a plain `anom`)
every helper here is a no-op for a single process. The group uses gloo for CPU
tensors and, when CUDA is present, NCCL for GPU tensors, with one GPU per
process (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import atomic_write_bytes

T = TypeVar("T")


def launched_distributed() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> None:
    """Join the group torchrun describes in the environment; does nothing when already joined or alone."""
    if dist.is_initialized() or not launched_distributed():
        return
    # torch.distributed.nn.functional binds `group=group.WORLD` as a default argument when first
    # imported (timm imports it, through torchvision and dynamo). Imported after the group exists,
    # it keeps the group alive past destroy_process_group: gloo's threads then outlive the
    # interpreter and abort the process at exit, now and then. Imported first, it binds None.
    import torch.distributed.nn  # noqa: F401
    backend = "gloo"
    # NCCL needs a GPU of its own per process; with more processes than GPUs (device=cpu runs),
    # every process uses gloo alone
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and processes_here <= torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: cuda becomes cuda:LOCAL_RANK; CPU stays CPU."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every process (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(counts: dict[str, Any]) -> dict[str, Any]:
    """Add counters (numbers) and join lists across processes, in rank order; every process gets the totals."""
    if not dist.is_initialized():
        return dict(counts)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, counts)
    return {key: sum((part[key] for part in gathered), [] if isinstance(value, list) else 0)
            for key, value in counts.items()}


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: items rank, rank + N, rank + 2N, ... (every item on exactly one process)."""
    return list(items[rank()::world_size()])


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model when there are several processes: gradients are
    averaged across processes after each backward, so every copy takes the same step.
    Frozen parameters (the encoder) are left out of the averaging."""
    if not dist.is_initialized():
        return model
    model.to(device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --- one output file from several processes -----------------------------------------------

def part_path(path: Path) -> Path:
    """Where this process writes its share of `path`; `path` itself when alone."""
    if world_size() == 1:
        return path
    return path.with_name(f"{path.stem}.part{rank():03d}-of-{world_size():03d}{path.suffix}")


def merge_jsonl_parts(path: Path, order: Sequence[str], key: str = "path") -> None:
    """Every process calls this once its part of `path` is complete; rank 0 writes `path`.

    The parts travel through the process group, not the file system, so processes on
    different machines need no shared folder for it. Each process removes its own part
    once `path` is written; if the merge fails, the parts stay.
    """
    own = part_path(path)
    lines = own.read_text().splitlines()
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(lines, gathered, dst=0)
    if is_main_process():
        write_merged(path, gathered, order, key)
    barrier()
    own.unlink()


def write_merged(path: Path, parts: Sequence[Sequence[str]], order: Sequence[str], key: str = "path") -> int:
    """Write the JSON lines of all `parts` into `path`, in `order` of their `key`; returns the count.

    Every record's `key` must be one of `order` and each must appear exactly once, so no
    input is lost or written twice.
    """
    records: dict[str, str] = {}
    for number, lines in enumerate(parts):
        for line in lines:
            name = json.loads(line)[key]
            if name in records:
                raise RuntimeError(f"{name} was written by more than one process (again by process {number})")
            records[name] = line
    missing = [name for name in order if name not in records]
    unexpected = sorted(set(records) - set(order))
    if missing or unexpected:
        raise RuntimeError(f"merging {path.name}: {len(missing)} inputs missing (first: {missing[:3]}), "
                           f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
    atomic_write_bytes(path, "".join(records[name] + "\n" for name in order).encode())
    return len(order)
