"""anomalib's DinomalyModel with anomcli's weights, for the side-by-side rows of bench_speed.py.

Benchmark environment only (`make bench-speed` installs anomalib into .venv-bench). anomalib
builds its encoder with `timm.create_model(..., pretrained=True)`; here that call is made with
random weights at the benchmark's input size (its 518-px position embedding would otherwise be
resampled to 28 x 28 on every call, a cost of about a millisecond), and the weights of an
anomcli Dinomaly are then copied in, so both models compute the same function:

- encoder: the same timm ViT, block for block;
- bottleneck and decoder MLPs: anomalib's have no biases, so anomcli's biases are set to zero;
- decoder groups: anomalib reverses the decoder outputs before grouping [[0..3], [4..7]], which
  pairs the same blocks as anomcli's [[4..7], [0..3]];
- linear attention: anomcli adds 1e-6 to the normaliser (a sum over ~800 positive terms);
- input: anomalib's pre-processor normalises images before the model, anomcli's encoder inside it.

The image scores differ by design, not by numerics: anomalib resizes the map to 256 px and
smooths it with a 5-px kernel (sigma 4) before the top-1 % mean; anomcli smooths at the input
size with sigma 4 scaled to it. `compare` therefore checks the un-smoothed anomaly maps, and the
scores after applying anomcli's smoothing and top-1 % mean to anomalib's map.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from anomcli.model.layers import SmoothUpsample


@contextmanager
def _random_timm_weights(input_size: int):
    import timm
    from anomalib.models.components.feature_extractors import timm as extractor_module

    create = timm.create_model

    def create_random(name, *args, **kwargs):
        kwargs.update(pretrained=False, img_size=input_size)
        return create(name, *args, **kwargs)

    extractor_module.timm.create_model = create_random
    try:
        yield
    finally:
        extractor_module.timm.create_model = create


def build_anomalib_dinomaly(input_size: int, encoder_name: str = "vit_small_patch14_reg4_dinov2") -> nn.Module:
    from anomalib.models.image.dinomaly.torch_model import DinomalyModel

    with _random_timm_weights(input_size):
        return DinomalyModel(encoder_name=encoder_name).eval()


@torch.no_grad()
def copy_weights_into_anomalib(ours: nn.Module, theirs: nn.Module) -> None:
    """Make `theirs` compute what `ours` (an anomcli Dinomaly with a ViT encoder) computes; zeroes our MLP biases."""
    vit = theirs.encoder.feature_extractor
    result = vit.load_state_dict(ours.encoder.vit.state_dict(), strict=False)
    # anomcli's encoder drops the blocks after the last tap and the final norm: only those may be missing
    unused = tuple(f"blocks.{i}." for i in range(len(ours.encoder.vit.blocks), len(vit.blocks))) + ("norm.",)
    if result.unexpected_keys or any(not key.startswith(unused) for key in result.missing_keys):
        raise RuntimeError(f"encoder weights do not line up: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    bottleneck = theirs.bottleneck[0]
    bottleneck.fc1.weight.copy_(ours.bottleneck.fc1.weight)
    bottleneck.fc2.weight.copy_(ours.bottleneck.fc2.weight)
    ours.bottleneck.fc1.bias.zero_()
    ours.bottleneck.fc2.bias.zero_()
    for mine, block in zip(ours.decoder.blocks, theirs.decoder):
        for name in ("norm1", "norm2", "attn.qkv", "attn.proj"):
            block.get_submodule(name).load_state_dict(mine.get_submodule(name).state_dict())
        block.mlp.fc1.weight.copy_(mine.mlp[0].weight)
        block.mlp.fc2.weight.copy_(mine.mlp[2].weight)
        mine.mlp[0].bias.zero_()
        mine.mlp[2].bias.zero_()


@torch.no_grad()
def compare(ours: nn.Module, theirs: nn.Module, images: torch.Tensor) -> dict:
    """Max |difference| of the un-smoothed maps, and of the scores under anomcli's post-processing."""
    encoded, decoded = ours(images)
    size = ours.input_size
    # un-smoothed: the same bilinear upsampling as ours.upsample, without its smoothing
    our_raw = SmoothUpsample(ours.encoder.grid_size, size, sigma=0, align_corners=True)(
        ours.distance_map(encoded, decoded))
    # anomalib's model takes images its pre-processor has normalised; anomcli's encoder normalises inside
    their_raw = theirs((images - ours.encoder.mean) / ours.encoder.std).anomaly_map
    blur = SmoothUpsample(size, size, sigma=ours.upsample.sigma)
    our_scores = ours.score(blur(our_raw))
    their_scores = ours.score(blur(their_raw))
    return {"raw_map_max_abs_diff": float((our_raw - their_raw).abs().max()),
            "score_max_abs_diff": float((our_scores - their_scores).abs().max()),
            "score_scale": float(our_scores.abs().max())}
