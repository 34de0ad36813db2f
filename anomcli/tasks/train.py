"""`anom train`: fit a detector on defect-free images and write `<run>/checkpoint/`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ..data.datamodule import endless_batches
from ..engine import distributed
from ..engine.checkpoint import load_checkpoint, previous_folder, save_checkpoint
from ..engine.evaluate import predict
from ..engine.feature_cache import encode_training_set, endless_tap_batches
from ..engine.fit import build_memory_bank, fit, fit_training_steps, resolve_device
from .common import UsageError, output_dir, training_statistics, warn_if_random_encoder

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    run_dir = output_dir(cfg)
    checkpoint_dir = run_dir / "checkpoint"
    torch.manual_seed(cfg.trainer.seed)
    device = distributed.local_device(resolve_device(cfg.trainer.device))
    rank, world_size = distributed.rank(), distributed.world_size()

    datamodule = instantiate(cfg.data)
    if distributed.is_main_process():  # generated data (coils) is written once, by rank 0
        datamodule.prepare()
    distributed.barrier()
    if not distributed.is_main_process():
        datamodule.prepare()
    model, model_cfg, resumed = _model_to_train(cfg, checkpoint_dir)
    # replaced, not merged: a checkpoint's model need not fit the schema of the default model/encoder
    saved_cfg = cfg.copy()
    with open_dict(saved_cfg):
        saved_cfg.model = model_cfg
    # models trained from scratch (VAE, GANomaly) may have no frozen encoder: nothing random to warn about
    has_encoder = model_cfg.get("encoder") is not None
    encoder_pretrained = bool(model_cfg.encoder.pretrained) if has_encoder else None
    if has_encoder:
        warn_if_random_encoder(encoder_pretrained)

    train_samples = datamodule.train_samples()
    input_size = model.input_size
    meta = {
        "model": model_cfg._target_.rsplit(".", 1)[-1].lower(),
        "input_size": input_size,
        "normalisation": _input_normalisation(model),
        **({"encoder_pretrained": encoder_pretrained} if has_encoder else {}),
        "train_images": len(train_samples),
        "data_root": str(datamodule.root),
        "tiling": {"tile": datamodule.tiling.tile, "overlap": datamodule.tiling.overlap},
        "world_size": world_size,
        "effective_batch_size": datamodule.batch_size * world_size,
    }

    def save(step: int, optimizer=None, scheduler=None) -> Path:
        if not distributed.is_main_process():  # under torchrun rank 0 alone writes the checkpoint
            return checkpoint_dir
        return save_checkpoint(checkpoint_dir, model, saved_cfg, {**meta, "trainer_step": step},
                               optimizer, scheduler)

    if callable(getattr(model, "fit", None)):  # a memory-bank model: no loss, no optimiser
        if not distributed.is_main_process():  # one pass, no gradients: rank 0 builds the bank alone
            return {"checkpoint": str(checkpoint_dir), "steps": 0, "rank": rank}
        result = build_memory_bank(model, datamodule.loader(train_samples, input_size), device=device, save=save)
    else:
        if world_size > 1:
            log.info("distributed training: %d processes x data.batch_size %d = effective batch %d; "
                     "trainer.lr %g is used as given (not scaled)", world_size, datamodule.batch_size,
                     datamodule.batch_size * world_size, cfg.trainer.lr)
        # a resumed run continues the batch stream where the saved step left it (exact unless a whole
        # batch was unreadable, which the loop skips without counting a step)
        start_batch = int(resumed.meta["trainer_step"]) if resumed is not None else 0
        # a model that writes its own training step (VAE, GANomaly) trains on images, else Dinomaly's loss
        own_step = callable(getattr(model, "training_step", None))
        if own_step and world_size > 1:
            raise UsageError(f"{meta['model']} trains in one process only: run it without torchrun")
        batches = _training_batches(cfg, datamodule, model, train_samples, device, start_batch,
                                    rank=rank, world_size=world_size,
                                    cache_encoder=cfg.trainer.cache_encoder and not own_step)
        trained = model if own_step else distributed.wrap_for_training(model, device)
        if world_size > 1:
            torch.manual_seed(cfg.trainer.seed + rank)  # each process draws its own bottleneck noise
        train_loop = fit_training_steps if own_step else fit
        result = train_loop(trained, batches, cfg.trainer, device=device, save=save,
                            resume_from=resumed.path if resumed is not None else None)
        if not distributed.is_main_process():  # rank 0 writes the statistics and the checkpoint
            return {"checkpoint": str(checkpoint_dir), "steps": result.steps, "final_loss": result.final_loss,
                    "train_seconds": result.seconds, "rank": rank}

    stats_samples = train_samples[:: max(1, len(train_samples) // max(1, cfg.trainer.stats_images))]
    stats_samples = stats_samples[: cfg.trainer.stats_images]
    stats = training_statistics(predict(model, datamodule.loader(stats_samples, input_size), device,
                                        description="training statistics"))
    save_checkpoint(checkpoint_dir, model, saved_cfg, {
        **meta, "trainer_step": result.steps, "train_seconds": round(result.seconds, 2),
        # memory-bank models have no loss; JSON has no NaN
        "final_loss": result.final_loss if math.isfinite(result.final_loss) else None,
        "train_statistics": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log.info("checkpoint written to %s", checkpoint_dir)
    return {"checkpoint": str(checkpoint_dir), "steps": result.steps, "final_loss": result.final_loss,
            "train_seconds": result.seconds}


def _training_batches(cfg: DictConfig, datamodule, model, train_samples, device, start_batch: int = 0, *,
                      rank: int = 0, world_size: int = 1, cache_encoder: bool = True):
    """Endless training batches from `start_batch` on: cached encoder taps when they fit in
    trainer.cache_encoder_gib, else images; both draw the same seeded order (ShuffledBatches).

    Under torchrun each process draws from its own share of the images (its own seed for the cache).
    Random tiles (data.tiling) differ at every step, so they are never cached.
    """
    if datamodule.tiling.enabled and cache_encoder:
        log.info("data.tiling draws new random tiles every step: the encoder taps are not cached")
    elif cache_encoder and callable(getattr(model, "encode", None)):
        taps = encode_training_set(model, datamodule.loader(distributed.shard(train_samples), model.input_size),
                                   device=device, max_gib=cfg.trainer.cache_encoder_gib)
        if taps is not None:
            return endless_tap_batches(taps, datamodule.batch_size, seed=cfg.trainer.seed + rank,
                                       start_batch=start_batch)
    return endless_batches(datamodule.loader(train_samples, model.input_size, shuffle=True, seed=cfg.trainer.seed,
                                             start_batch=start_batch, rank=rank, world_size=world_size))


def _model_to_train(cfg: DictConfig, checkpoint_dir: Path):
    """A new model, or one continued from a checkpoint: (model, its config, the checkpoint to resume)."""
    source = Path(cfg.ckpt) if cfg.ckpt else None
    if source is None and cfg.trainer.resume:
        saved = [checkpoint_dir, previous_folder(checkpoint_dir)]  # the second: left by a killed save
        if not any((folder / "meta.json").is_file() for folder in saved):
            raise UsageError(f"trainer.resume=true but {checkpoint_dir} holds no checkpoint: point "
                             "hydra.run.dir at the run to continue, or give ckpt=<run>/checkpoint")
        source = checkpoint_dir
    if source is None:
        return instantiate(cfg.model), cfg.model, None
    checkpoint = load_checkpoint(source)
    model_cfg = checkpoint.config.model
    # the encoder keeps the checkpoint's weights; pretrained records where they first came from
    if model_cfg.get("encoder") is not None:
        with open_dict(model_cfg):
            model_cfg.encoder.pretrained = bool(checkpoint.meta.get("encoder_pretrained", True))
    log.info("%s from %s", "resuming" if cfg.trainer.resume else "fine-tuning", source)
    # checkpoint.path: the last complete save, even when a killed save left only that one
    return checkpoint.model, model_cfg, checkpoint if cfg.trainer.resume else None


def _input_normalisation(model) -> dict:
    """Mean and std the model subtracts and divides by: its own (VAE, GANomaly) or its encoder's."""
    source = model if hasattr(model, "mean") else model.encoder
    return {"mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist()}
