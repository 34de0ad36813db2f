"""Image AUROC of one trained Dinomaly checkpoint under other ways of turning its maps into scores.

    python scripts/dinomaly_scoring.py runs/bench_quality/mtd_dinomaly_lite0/train/checkpoint \
        [--data-root ../shared/data/mtd]

The encoder/decoder distances are computed once on the test split; each line then re-scores
them with another smoothing sigma (on the 256-px reference scale, as `model.map_sigma`) and
another top fraction of pixels (`model.score_top_fraction`), or with one layer group alone.
Nothing is trained, so it says whether the scoring, rather than the model, limits AUROC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anomcli.engine.checkpoint import load_checkpoint  # noqa: E402
from anomcli.metrics import image_metrics  # noqa: E402
from anomcli.model.dinomaly import REFERENCE_MAP_SIZE  # noqa: E402
from anomcli.model.layers import SmoothUpsample, top_fraction_mean  # noqa: E402
from anomcli.tasks.common import data_module_for  # noqa: E402


def group_distances(model, loader) -> torch.Tensor:
    """[N, groups, h, w]: 1 - cosine between encoder and decoder group maps, before upsampling."""
    parts = []
    with torch.inference_mode():
        for batch in loader:
            parts.append(model.group_distances(*model(batch["images"])))
    return torch.cat(parts)


def scores(distances: torch.Tensor, size: int, sigma: float, top_fraction: float) -> np.ndarray:
    """distances [N, groups, h, w] -> image scores, as Dinomaly.anomaly_map and .score make them."""
    upsample = SmoothUpsample(distances.shape[-1], size, sigma=sigma * size / REFERENCE_MAP_SIZE, align_corners=True)
    maps = upsample(distances.mean(1, keepdim=True))
    return top_fraction_mean(maps, top_fraction).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-root", default="../shared/data/mtd")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--top-fractions", type=float, nargs="+", default=[0.001, 0.01, 0.05])
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.model.eval()
    datamodule = data_module_for(OmegaConf.create({"_target_": None, "root": args.data_root, "batch_size": 16}),
                                 checkpoint)
    samples = datamodule.test_samples()
    labels = np.array([s.label for s in samples])
    distances = group_distances(model, datamodule.loader(samples, model.input_size))

    def line(name: str, values: np.ndarray) -> None:
        metrics = image_metrics(labels, values)  # the definitions `anom validate` reports
        print(f"| {name} | {metrics['auroc']:.3f} | {metrics['fpr_at_95_recall']:.3f} |")

    print("| scoring | image AUROC | FPR @ 95 % recall |\n|---|---|---|")
    for sigma in args.sigmas:
        for fraction in args.top_fractions:
            line(f"sigma {sigma:g}, top {100 * fraction:g} %", scores(distances, model.input_size, sigma, fraction))
    for group in range(distances.shape[1]):
        line(f"group {group} alone (sigma 4, top 1 %)",
             scores(distances[:, group:group + 1], model.input_size, 4, 0.01))


if __name__ == "__main__":
    main()
