"""Detection quality on an MVTec-layout dataset (default: MTD), every model in one run.

    python scripts/bench_quality.py [--data-root ../shared/data/mtd] [--experiments mtd_dinomaly_lite0 ...]

The default experiments are the four models: Dinomaly and PatchCore (EfficientNet-Lite0 encoder),
the convolutional VAE and GANomaly (trained from scratch), all at 256 px.

For each experiment it runs, through the real CLI: `anom train experiment=<name>`,
`anom threshold target_recall=0.95` (on the test split: the operating point is
chosen on the data it is then measured on, and labelled so), `anom validate`,
then times batched scoring of the test split in-process. One table goes into
docs/BENCHMARKS.md between the bench_quality markers, with the command and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks_doc import cpu_name, replace_section  # noqa: E402  (this folder)
from anomcli.engine.checkpoint import load_checkpoint  # noqa: E402
from anomcli.engine.evaluate import predict  # noqa: E402
from anomcli.tasks.common import data_module_for  # noqa: E402

START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"


def anom(*args: str) -> float:
    """Run one CLI command; return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomcli", *args], cwd=REPO, check=True)
    return time.perf_counter() - started


def inference_speed(checkpoint_dir: Path, data_root: str, batch_size: int) -> float:
    """Images/s of decode + resize + model + map + score over the test split, batch `batch_size`."""
    checkpoint = load_checkpoint(checkpoint_dir)
    from omegaconf import OmegaConf

    datamodule = data_module_for(OmegaConf.create({"_target_": None, "root": data_root,
                                                   "batch_size": batch_size}), checkpoint)
    samples = datamodule.test_samples()
    loader = datamodule.loader(samples, checkpoint.model.input_size)
    started = time.perf_counter()
    predict(checkpoint.model, loader, torch.device("cpu"), keep_maps=False, description="speed")
    return len(samples) / (time.perf_counter() - started)


def run_experiment(name: str, data_root: str, out: Path, extra: list[str]) -> dict:
    train_dir = out / name / "train"
    ckpt = train_dir / "checkpoint"
    train_seconds = anom("train", f"experiment={name}", f"data.root={data_root}",
                         f"hydra.run.dir={train_dir}", *extra)
    anom("threshold", f"ckpt={ckpt}", "target_recall=0.95", f"hydra.run.dir={out / name / 'threshold'}")
    anom("validate", f"ckpt={ckpt}", "heatmaps=none", f"hydra.run.dir={out / name / 'validate'}")
    metrics = json.loads((out / name / "validate" / "metrics.json").read_text())
    meta = json.loads((ckpt / "meta.json").read_text())
    return {"experiment": name, "metrics": metrics, "train_seconds": train_seconds,
            "fit_seconds": meta.get("train_seconds"), "steps": meta.get("trainer_step"),
            "images_per_s": inference_speed(ckpt, data_root, 16)}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(results: list[dict]) -> str:
    head = ["experiment", "image AUROC", "image AP", "image F1-max", "pixel AUROC", "AUPRO",
            "FPR @ 95 % recall", "recall @ thr", "FPR @ thr", "train s", "infer img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        op = m.get("operating_point", {})
        lines.append("| " + " | ".join([
            r["experiment"], fmt(m["image"]["auroc"]), fmt(m["image"]["ap"]), fmt(m["image"]["f1_max"]),
            fmt(m.get("pixel", {}).get("auroc")), fmt(m.get("pixel", {}).get("aupro")),
            fmt(m["image"]["fpr_at_95_recall"]), fmt(op.get("recall")), fmt(op.get("fpr")),
            f"{r['train_seconds']:.0f}", f"{r['images_per_s']:.1f}"]) + " |")
    types = sorted({t for r in results for t in r["metrics"]["per_defect"]})
    lines += ["", "Per defect type, image AUROC (each type against all good test images):", "",
              "| experiment | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 1)]
    for r in results:
        per = r["metrics"]["per_defect"]
        lines.append(f"| {r['experiment']} | " + " | ".join(fmt(per.get(t, {}).get("auroc")) for t in types) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/mtd")
    parser.add_argument("--experiments", nargs="+",
                        default=["mtd_dinomaly_lite0", "mtd_patchcore_lite0", "mtd_vae", "mtd_gan"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-report", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every train run (quick checks)")
    args = parser.parse_args()

    started = time.perf_counter()
    results = [run_experiment(name, args.data_root, args.out, args.overrides) for name in args.experiments]
    minutes = (time.perf_counter() - started) / 60
    command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"### Detection quality on `{args.data_root}` (`make bench-quality`)", "",
        f"Command: `{command.strip()}`  ",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; whole run {minutes:.1f} min.  ",
        "`recall @ thr` / `FPR @ thr`: at the threshold `anom threshold target_recall=0.95` chose "
        "**on this same test split** (an optimistic operating point, not a held-out one). "
        "`infer img/s`: decode + resize + model + map + score, batch 16, CPU.", "",
        table(results)])
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(text)
    if not args.no_report:
        replace_section(args.report, START, END, text)


if __name__ == "__main__":
    main()
