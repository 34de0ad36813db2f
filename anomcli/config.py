"""Structured config schemas: the typed shape of every swappable part.

Each YAML file of a config group starts from one of these schemas
(`defaults: [/schema/<group>/<name>@_here_, _self_]`), so a misspelt key or a
value of the wrong type fails at composition, before any work starts.
The YAML files stay the registry of variants; these classes only fix their shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# --- data -------------------------------------------------------------------

@dataclass
class TilingConfig:
    """Score images in overlapping square tiles at full resolution instead of resizing them whole."""

    tile: int = 0  # tile side in image pixels; 0: off (each image is resized to the model's input)
    overlap: float = 0.25  # share of a tile that neighbouring tiles share, in [0, 1)


@dataclass
class TilingFromCheckpointConfig:
    """The checkpoint's tiling unless set: tile=0 turns it off, tile=N sets the tile side."""

    tile: Optional[int] = None
    overlap: Optional[float] = None


@dataclass
class FolderDataConfig:
    """An MVTec-AD layout folder: train/good, test/<type>, ground_truth/<type>."""

    _target_: str = "anomcli.data.datamodule.FolderDataModule"
    name: str = "folder"
    root: str = MISSING
    batch_size: int = 16
    num_workers: int = 2
    extra_good: Optional[str] = None  # a folder of confirmed-good images trained on with train/good
    tiling: TilingConfig = field(default_factory=TilingConfig)


@dataclass
class CoilsDataConfig(FolderDataConfig):
    """The embedded synthetic aluminium-coil dataset, generated on first use."""

    _target_: str = "anomcli.data.datamodule.CoilsDataModule"
    name: str = "coils"
    root: str = ".cache/coils"
    seed: int = 0
    n_train: int = 200
    n_test_good: int = 40
    n_test_per_defect: int = 10
    height: int = 256
    width: int = 256


@dataclass
class DataFromCheckpointConfig:
    """Use the data the checkpoint was trained with; non-null fields override it."""

    _target_: Optional[str] = None
    root: Optional[str] = None
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    extra_good: Optional[str] = None
    tiling: TilingFromCheckpointConfig = field(default_factory=TilingFromCheckpointConfig)


@dataclass
class InferDataConfig:
    """infer reads files, not a dataset: only how its images are cut into tiles."""

    tiling: TilingFromCheckpointConfig = field(default_factory=TilingFromCheckpointConfig)


# --- model parts --------------------------------------------------------------

@dataclass
class EncoderConfig:
    """What every frozen encoder takes: a timm model, the blocks to tap, where weights come from."""

    _target_: str = MISSING
    model_name: str = MISSING
    taps: list[int] = MISSING
    input_size: int = MISSING
    pretrained: bool = True
    weights: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ViTEncoderConfig(EncoderConfig):
    _target_: str = "anomcli.model.encoder.ViTEncoder"
    taps: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    input_size: int = 392


@dataclass
class CNNEncoderConfig(EncoderConfig):
    _target_: str = "anomcli.model.encoder.CNNEncoder"
    input_size: int = 256
    grid_stride: int = 16
    dim: Optional[int] = None
    num_heads: int = 4


@dataclass
class NoisyMLPConfig:
    _target_: str = "anomcli.model.bottleneck.NoisyMLP"
    _partial_: bool = True
    dropout: float = 0.2
    hidden_ratio: float = 4.0


@dataclass
class TransformerDecoderConfig:
    _target_: str = "anomcli.model.decoder.TransformerDecoder"
    _partial_: bool = True
    depth: int = 8
    attention: str = "linear"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    eps: float = 1e-6


@dataclass
class DinomalyConfig:
    _target_: str = "anomcli.model.dinomaly.Dinomaly"
    encoder: Any = MISSING
    bottleneck: Any = MISSING
    decoder: Any = MISSING
    encoder_groups: list[list[int]] = field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    decoder_groups: list[list[int]] = field(default_factory=lambda: [[4, 5, 6, 7], [0, 1, 2, 3]])
    map_sigma: float = 4.0
    score_top_fraction: float = 0.01


@dataclass
class PatchCoreConfig:
    _target_: str = "anomcli.model.patchcore.PatchCore"
    encoder: Any = MISSING
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    neighbourhood: int = 3
    num_neighbours: int = 9
    map_sigma: float = 4.0
    seed: int = 0


@dataclass
class VAEConfig:
    _target_: str = "anomcli.model.vae.VAE"
    input_size: int = 256
    latent_dim: int = 128
    width: int = 32
    max_width: int = 256
    beta: float = 1.0
    pixel_loss: str = "mse"
    encoder: Any = None
    feature_weight: float = 0.0
    map_sigma: float = 4.0
    score_top_fraction: float = 0.01


@dataclass
class GANomalyConfig:
    _target_: str = "anomcli.model.gan.GANomaly"
    input_size: int = 256
    latent_dim: int = 100
    width: int = 32
    max_width: int = 256
    adversarial_weight: float = 1.0
    contextual_weight: float = 50.0
    latent_weight: float = 1.0
    discriminator_reset_below: float = 1e-5
    map_sigma: float = 4.0


# --- trainer ------------------------------------------------------------------

@dataclass
class TrainerConfig:
    max_steps: int = 5000
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    final_lr_factor: float = 0.1
    grad_clip: float = 0.1
    hard_mining_p: float = 0.9
    hard_mining_ramp_steps: int = 1000
    hard_mining_factor: float = 0.1
    save_every: int = 500
    log_every: int = 10
    stats_images: int = 64
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    # the frozen encoder's taps of all training images are computed once when they fit in this much memory
    cache_encoder: bool = True
    cache_encoder_gib: float = 4.0


# --- tasks --------------------------------------------------------------------

@dataclass
class InferConfig:
    """`anom infer`: typed, so `batch_size=abc` or `resume=maybe` fails before any work."""

    task_name: str = "infer"
    ckpt: str = MISSING
    input: str = MISSING
    threshold: Optional[float] = None
    heatmaps: str = "flagged"
    batch_size: int = 16
    num_workers: int = 2
    device: str = "auto"
    resume: bool = False
    precision: str = "auto"
    compile: bool = False
    data: InferDataConfig = field(default_factory=InferDataConfig)
    paths: Any = None


@dataclass
class FalsePositiveReportConfig:
    enabled: bool = True
    max_train_images: int = 1000
    unlike_quantile: float = 0.95


@dataclass
class ValidateConfig:
    """`anom validate`: typed, so a misspelt key or `false_positives.enabled=maybe` fails before scoring."""

    task_name: str = "validate"
    ckpt: str = MISSING
    device: str = "auto"
    heatmaps: str = "all"
    false_positives: FalsePositiveReportConfig = field(default_factory=FalsePositiveReportConfig)
    precision: str = "auto"
    compile: bool = False
    data: Any = None  # the data group (from_checkpoint by default) brings its own schema
    paths: Any = None


@dataclass
class SyntheticDefectsConfig:
    per_image: int = 3
    seed: int = 0


@dataclass
class ThresholdConfig:
    """`anom threshold`: typed, so `target_recall=abc` fails before any image is scored."""

    task_name: str = "threshold"
    ckpt: str = MISSING
    device: str = "auto"
    method: str = "auto"
    target_recall: float = 0.95
    target_fpr: Optional[float] = None
    confidence: float = 0.95
    synthetic: SyntheticDefectsConfig = field(default_factory=SyntheticDefectsConfig)
    precision: str = "auto"
    compile: bool = False
    data: Any = None
    paths: Any = None


SCHEMAS = {
    "data": {"folder": FolderDataConfig, "coils": CoilsDataConfig, "from_checkpoint": DataFromCheckpointConfig},
    "model/encoder": {"vit": ViTEncoderConfig, "cnn": CNNEncoderConfig},
    "model/bottleneck": {"noisy_mlp": NoisyMLPConfig},
    "model/decoder": {"transformer": TransformerDecoderConfig},
    "model": {"dinomaly": DinomalyConfig, "patchcore": PatchCoreConfig, "vae": VAEConfig, "gan": GANomalyConfig},
    "trainer": {"trainer": TrainerConfig},
    "task": {"infer": InferConfig, "validate": ValidateConfig, "threshold": ThresholdConfig},
}


def register_schemas() -> None:
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
