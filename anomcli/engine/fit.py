"""The training loop: settings, setup, loop, periodic checkpoint (after nanoGPT's train.py)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.progress import TextColumn

from ..data.datamodule import readable_batches
from ..model.losses import global_cosine_loss, hard_mining_fraction
from .optim import StableAdamW, build_scheduler
from .progress import progress_bar
from .checkpoint import load_training_state

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    steps: int
    final_loss: float
    seconds: float
    images_seen: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_memory_bank(model: torch.nn.Module, loader, *, device: torch.device,
                      save: Callable[[int], Path]) -> FitResult:
    """Models without a loss (PatchCore): one pass over the training images, `model.fit`, save."""
    model.to(device).eval()
    started, seen = time.perf_counter(), 0

    def images():
        nonlocal seen
        with progress_bar() as bar:
            task = bar.add_task("memory bank", total=len(loader.dataset))
            for batch in readable_batches(loader):
                bar.advance(task, len(batch["indices"]) + len(batch["errors"]))
                seen += batch["images"].shape[0]
                yield batch["images"].to(device, non_blocking=True)
            bar.update(task, completed=len(loader.dataset))  # batches with no readable image were skipped

    with torch.no_grad():
        model.fit(images())
    save(0)
    return FitResult(0, float("nan"), time.perf_counter() - started, seen)


def fit(model: torch.nn.Module, batches, trainer, *, device: torch.device,
        save: Callable[..., Path], resume_from: Path | None = None) -> FitResult:
    """Train the decoder side of a reconstruction model (Dinomaly) for `trainer.max_steps` steps.

    batches: an endless iterator of {"images": [B, 3, S, S]} or of {"taps": the model's encoder taps}.
    save(step, optimizer, scheduler): writes a checkpoint with the training state and returns its folder.
    resume_from: a checkpoint folder whose training state to continue.
    """
    def training_step(batch: dict, step: int, update: Callable) -> tuple[dict[str, torch.Tensor], int]:
        # cached encoder taps (feature_cache.py) skip the frozen encoder
        inputs = batch["taps"] if "taps" in batch else batch["images"].to(device, non_blocking=True)
        p = hard_mining_fraction(step, final=trainer.hard_mining_p, ramp_steps=trainer.hard_mining_ramp_steps)
        encoded, decoded = model(inputs)
        loss = global_cosine_loss(encoded, decoded, hard_fraction=p, easy_factor=trainer.hard_mining_factor)
        update("decoder", loss)
        return {"loss": loss}, encoded[0].shape[0]

    trainable = {"decoder": [p for p in model.parameters() if p.requires_grad]}
    return _train(model, trainable, training_step, batches, trainer, device=device, save=save,
                  resume_from=resume_from, remedy="lower trainer.lr or raise model.decoder.eps")


def fit_training_steps(model: torch.nn.Module, batches, trainer, *, device: torch.device,
                       save: Callable[..., Path], resume_from: Path | None = None) -> FitResult:
    """Train a model that writes its own step (VAE, GANomaly) for `trainer.max_steps` steps.

    The model computes its losses and decides the order of its updates; the engine owns the
    optimiser, the schedule, clipping and checkpoints. The model provides:

        parameter_groups() -> {name: [parameters]}
            what each of its updates trains (GANomaly: "generator", "discriminator");
        training_step(images, update) -> {term: scalar tensor}
            computes its losses on a batch and calls update(name, loss) once per group, in the
            order it needs; "loss" in the returned terms is shown on the progress bar.

    update(name, loss) backpropagates `loss` into that group's parameters only, clips their
    gradient norm to trainer.grad_clip and steps the optimiser, which then moves only them.
    One StableAdamW holds every group as a param group, and the schedule steps once per
    training step, so checkpoints and trainer.resume work as for `fit`.

    batches: an endless iterator of {"images": [B, 3, S, S]}.
    save(step, optimizer, scheduler): writes a checkpoint with the training state, as for `fit`.
    """
    def training_step(batch: dict, step: int, update: Callable) -> tuple[dict[str, torch.Tensor], int]:
        images = batch["images"].to(device, non_blocking=True)
        return model.training_step(images, update), images.shape[0]

    return _train(model, model.parameter_groups(), training_step, batches, trainer, device=device, save=save,
                  resume_from=resume_from, remedy="lower trainer.lr")


def _train(model: torch.nn.Module, groups: dict[str, list[torch.nn.Parameter]], training_step: Callable,
           batches, trainer, *, device: torch.device, save: Callable[..., Path], resume_from: Path | None,
           remedy: str) -> FitResult:
    """The loop both kinds of model share: optimiser, schedule, resume, progress, checkpoints.

    training_step(batch, step, update) -> (loss terms, images in the batch); it calls
    update(group name, loss) for each of its updates. remedy: what to try when a loss is not finite.
    """
    model.to(device).train()
    optimizer = StableAdamW([{"params": params, "name": name} for name, params in groups.items()],
                            lr=trainer.lr, betas=tuple(trainer.betas), weight_decay=trainer.weight_decay,
                            amsgrad=True)
    scheduler = build_scheduler(optimizer, total_steps=trainer.max_steps,
                                warmup_steps=trainer.warmup_steps, final_factor=trainer.final_lr_factor)
    step = 0
    if resume_from is not None:
        step = load_training_state(resume_from, optimizer, scheduler)
        log.info("resuming from step %d of %s", step, resume_from)

    def update(name: str, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name} loss became {loss.item()} at step {step}; {remedy}")
        optimizer.zero_grad(set_to_none=True)
        if len(groups) == 1:
            loss.backward()  # a plain backward, as DistributedDataParallel's gradient hooks expect
        else:
            loss.backward(inputs=groups[name])  # the other groups get no gradient, so the step leaves them
        torch.nn.utils.clip_grad_norm_(groups[name], trainer.grad_clip)
        optimizer.step()

    loss_value, images_seen, started = float("nan"), 0, time.perf_counter()
    terms: dict[str, torch.Tensor] | None = None
    with progress_bar(TextColumn("loss {task.fields[loss]:.4f}"),
                      TextColumn("{task.fields[speed]:.1f} img/s")) as bar:
        task = bar.add_task("train", total=trainer.max_steps, completed=step, loss=float("nan"), speed=0.0)
        while step < trainer.max_steps:
            terms, batch_size = training_step(next(batches), step, update)
            scheduler.step()
            step += 1
            images_seen += batch_size

            if step % trainer.log_every == 0 or step == trainer.max_steps:
                loss_value = terms["loss"].item()
                speed = images_seen / max(time.perf_counter() - started, 1e-9)
                bar.update(task, completed=step, loss=loss_value, speed=speed)
            if step % trainer.save_every == 0 and step < trainer.max_steps:
                save(step, optimizer, scheduler)
                # a line in the log too: the bar is invisible when output goes to a file
                log.info("step %d/%d %s, checkpoint saved", step, trainer.max_steps, _format_terms(terms))
    save(step, optimizer, scheduler)
    if terms is not None:
        log.info("step %d/%d %s", step, trainer.max_steps, _format_terms(terms))
    loss_value = loss_value if math.isfinite(loss_value) else float("nan")
    return FitResult(step, loss_value, time.perf_counter() - started, images_seen)


def _format_terms(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {value.item():.4f}" for name, value in terms.items())
