"""Encode the training images once: the encoder is frozen and the images are not augmented, so
every epoch would recompute the same taps. Training then costs only the bottleneck and decoder."""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from ..data.datamodule import ShuffledBatches, readable_batches
from .progress import progress_bar

log = logging.getLogger(__name__)


def encode_training_set(model: torch.nn.Module, loader, *, device: torch.device,
                        max_gib: float) -> list[torch.Tensor] | None:
    """model.encode over every readable image of `loader` -> one [N, tokens, D] tensor per tap,
    kept on `device`; None (and a log line) when the taps would take more than `max_gib`."""
    model.to(device).eval()
    num_images = len(loader.dataset)
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad(), progress_bar() as bar:
        task = bar.add_task("encode training set", total=num_images)
        for batch in readable_batches(loader):
            taps = model.encode(batch["images"].to(device, non_blocking=True))
            if not chunks:
                per_image = sum(t[0].numel() * t.element_size() for t in taps)
                needed_gib = per_image * num_images / 2**30
                if needed_gib > max_gib:
                    log.info("encoder taps of %d images need %.1f GiB > trainer.cache_encoder_gib=%.1f: "
                             "encoding every batch instead", num_images, needed_gib, max_gib)
                    return None
            chunks.append(taps)
            bar.advance(task, len(batch["indices"]) + len(batch["errors"]))
        bar.update(task, completed=num_images)
    if not chunks:
        return None
    return [torch.cat(per_tap) for per_tap in zip(*chunks)]


def endless_tap_batches(taps: list[torch.Tensor], batch_size: int, *, seed: int,
                        start_batch: int = 0) -> Iterator[dict]:
    """Shuffled batches of cached taps, epoch after epoch, from batch `start_batch` on, in the order
    the image loader draws (ShuffledBatches: a resumed run sees what an uninterrupted one saw)."""
    num_images = taps[0].shape[0]
    for indices in ShuffledBatches(num_images, min(batch_size, num_images), seed, start_batch):
        index = torch.tensor(indices, device=taps[0].device)
        yield {"taps": [t[index] for t in taps]}
