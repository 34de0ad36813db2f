"""False alarms under new conditions, and one feedback round, on MTD split by acquisition group.

    python scripts/bench_feedback.py [--data-root ../shared/data/mtd] [--unseen exp5 exp6] [--steps 700]

MTD file names start with their acquisition group (`exp<k>_num_<id>.jpg`). The
groups in --unseen play "other production conditions"; the rest are "seen".
Everything runs through the real CLI on data views: folders of symbolic links
into --data-root under <out>/views, so no image is copied.

    train_seen/    train/good: seen-group training images minus the calibration set
    calibration/   test/good: --calibration-images seen-group training images, never trained on
    test_seen/     test/good: seen-group test images; test/<defect>: every defective image
    test_unseen/   test/good: unseen-group test images; test/<defect>: every defective image
    feedback/      --feedback-images unseen-group *training* images (never tested on),
                   each linked --feedback-repeat times so a short fine-tune sees them often

Steps: train on train_seen; `anom threshold target_fpr=a` on calibration (the
conformal rule); `anom validate` on test_seen and test_unseen; fine-tune from
that checkpoint with `data.extra_good=feedback`; threshold and validate again.
The table goes into docs/BENCHMARKS.md between the bench_feedback markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks_doc import cpu_name, replace_section  # noqa: E402  (this folder)
from anomcli.data.image_io import list_images  # noqa: E402

START, END = "<!-- bench_feedback:start -->", "<!-- bench_feedback:end -->"


def group_of(path: Path) -> str:
    """`exp3_num_1234.jpg` -> `exp3`: MTD's acquisition group."""
    return path.name.split("_", 1)[0]


def evenly_spaced(items: list, count: int) -> list:
    if count <= 0:
        return []
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def link_files(files, folder: Path, repeat: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        for r in range(repeat):
            name = path.name if r == 0 else f"{path.stem}__repeat{r}{path.suffix}"
            os.symlink(path.resolve(), folder / name)


def link_folder(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), target, target_is_directory=True)


def build_views(data_root: Path, views: Path, unseen: set[str], calibration_images: int, feedback_images: int,
                feedback_repeat: int) -> dict:
    if not (data_root / "train" / "good").is_dir():
        raise SystemExit(f"{data_root} has no train/good: give MTD's folder with --data-root")
    if views.exists():
        shutil.rmtree(views)
    train = list_images(data_root / "train" / "good")
    test_good = list_images(data_root / "test" / "good")
    groups = sorted({group_of(p) for p in train + test_good})
    missing = unseen - set(groups)
    if missing:
        raise SystemExit(f"--unseen names groups not in {data_root}: {sorted(missing)}; groups: {groups}")
    seen_train = [p for p in train if group_of(p) not in unseen]
    calibration = evenly_spaced(seen_train, calibration_images)
    fit = [p for p in seen_train if p not in set(calibration)]
    feedback = evenly_spaced([p for p in train if group_of(p) in unseen], feedback_images)
    defects = [p for p in sorted((data_root / "test").iterdir()) if p.is_dir() and p.name != "good"]
    # the feedback images must never be tested on: MTD's train and test splits share no file
    overlap = {p.name for p in feedback} & {p.name for p in test_good}
    if overlap:
        raise SystemExit(f"feedback images also in test/good: {sorted(overlap)[:5]}")

    link_files(fit, views / "train_seen" / "train" / "good")
    link_files(calibration, views / "calibration" / "test" / "good")
    for name, good in (("test_seen", [p for p in test_good if group_of(p) not in unseen]),
                       ("test_unseen", [p for p in test_good if group_of(p) in unseen])):
        link_files(good, views / name / "test" / "good")
        for defect in defects:
            link_folder(defect, views / name / "test" / defect.name)
            if (data_root / "ground_truth" / defect.name).is_dir():
                link_folder(data_root / "ground_truth" / defect.name, views / name / "ground_truth" / defect.name)
    # every view needs train/good (the layout check, and the nearest-training-image distances)
    for name in ("calibration", "test_seen", "test_unseen"):
        link_folder(views / "train_seen" / "train" / "good", views / name / "train" / "good")
    link_files(feedback, views / "feedback", repeat=feedback_repeat)
    return {"groups": groups, "unseen": sorted(unseen), "seen": sorted(set(groups) - unseen),
            "train_images": len(fit), "calibration_images": len(calibration), "feedback_images": len(feedback),
            "feedback_repeat": feedback_repeat,
            "test_good_seen": sum(group_of(p) not in unseen for p in test_good),
            "test_good_unseen": sum(group_of(p) in unseen for p in test_good),
            "defective": sum(len(list_images(d)) for d in defects)}


def anom(*args: str) -> float:
    """Run one CLI command; return its wall time in seconds."""
    started = time.perf_counter()
    print("+ anom " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "anomcli", *args], cwd=REPO, check=True)
    return time.perf_counter() - started


def measure(name: str, ckpt: Path, views: Path, out: Path, target_fpr: float) -> dict:
    """Conformal threshold on the calibration view, then validate on seen and unseen conditions."""
    anom("threshold", f"ckpt={ckpt}", f"data.root={views / 'calibration'}", f"target_fpr={target_fpr}",
         f"hydra.run.dir={out / name / 'threshold'}")
    row = {"threshold": json.loads((ckpt / "threshold.json").read_text())}
    for conditions in ("seen", "unseen"):
        run_dir = out / name / f"validate_{conditions}"
        anom("validate", f"ckpt={ckpt}", f"data.root={views / f'test_{conditions}'}", "heatmaps=none",
             f"hydra.run.dir={run_dir}")
        row[conditions] = json.loads((run_dir / "metrics.json").read_text())
    return row


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: dict, target_fpr: float) -> str:
    head = ["model", "conditions", "good test images", "image AUROC", "FPR @ 95 % recall",
            f"promised FPR (conformal, a={target_fpr})", "observed FPR @ conformal thr",
            "recall @ conformal thr", "flagged good unlike training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, row in rows.items():
        for conditions in ("seen", "unseen"):
            m = row[conditions]
            op = m.get("operating_point", {})
            fp = m.get("false_positives") or {}
            unlike = f"{fp.get('unlike_training')} of {fp.get('flagged')}" if fp.get("flagged") is not None else "-"
            lines.append("| " + " | ".join([
                model, conditions, str(m["counts"]["good"]), fmt(m["image"]["auroc"]),
                fmt(m["image"]["fpr_at_95_recall"]), f"<= {target_fpr}", fmt(op.get("fpr")),
                fmt(op.get("recall")), unlike]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/mtd"),
                        help="MTD in the MVTec layout (default as for data=mtd, from the repository root)")
    parser.add_argument("--unseen", nargs="+", default=["exp5", "exp6"], help="acquisition groups held out")
    parser.add_argument("--experiment", default="mtd_dinomaly_lite0")
    parser.add_argument("--steps", type=int, default=700, help="training steps of the first model")
    parser.add_argument("--feedback-steps", type=int, default=200, help="fine-tuning steps of the feedback round")
    parser.add_argument("--calibration-images", type=int, default=80)
    parser.add_argument("--feedback-images", type=int, default=16)
    parser.add_argument("--feedback-repeat", type=int, default=4)
    parser.add_argument("--target-fpr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_feedback")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-report", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("overrides", nargs="*", help="extra overrides for both train runs (quick checks)")
    args = parser.parse_args()

    started = time.perf_counter()
    out, views = args.out.resolve(), args.out.resolve() / "views"
    split = build_views(args.data_root, views, set(args.unseen), args.calibration_images, args.feedback_images,
                        args.feedback_repeat)
    print(json.dumps(split), flush=True)

    base = out / "base" / "train"
    seconds = {"train": anom("train", f"experiment={args.experiment}", f"data.root={views / 'train_seen'}",
                             f"trainer.max_steps={args.steps}", f"trainer.save_every={args.steps}",
                             f"hydra.run.dir={base}", *args.overrides)}
    rows = {"before feedback": measure("base", base / "checkpoint", views, out, args.target_fpr)}

    tuned = out / "feedback" / "train"
    seconds["feedback"] = anom(
        "train", f"experiment={args.experiment}", f"ckpt={base / 'checkpoint'}", f"data.root={views / 'train_seen'}",
        f"data.extra_good={views / 'feedback'}", f"trainer.max_steps={args.feedback_steps}",
        f"trainer.save_every={args.feedback_steps}", f"trainer.warmup_steps={max(1, args.feedback_steps // 10)}",
        f"hydra.run.dir={tuned}", *args.overrides)
    rows["after 1 feedback round"] = measure("feedback", tuned / "checkpoint", views, out, args.target_fpr)
    minutes = (time.perf_counter() - started) / 60

    threshold = rows["before feedback"]["threshold"]
    command = "python scripts/bench_feedback.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "### False alarms under unseen conditions, and one feedback round (`make bench-feedback`)", "",
        f"Command: `{command.strip()}`  ",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}; "
        f"whole run {minutes:.1f} min (train {seconds['train']:.0f} s, feedback fine-tune {seconds['feedback']:.0f} s).  ",
        f"MTD acquisition groups: seen {', '.join(split['seen'])}; unseen {', '.join(split['unseen'])}. "
        f"`{args.experiment}` trained {args.steps} steps on {split['train_images']} seen-group training images. "
        f"Conformal threshold (`anom threshold target_fpr={args.target_fpr}`) on {split['calibration_images']} "
        f"seen-group training images held out from training (n={threshold['n_good']}, smallest a it allows "
        f"{threshold['smallest_target_fpr']:.4f}). Feedback: fine-tune {args.feedback_steps} steps from that "
        f"checkpoint with `data.extra_good=` {split['feedback_images']} unseen-group *training* images "
        f"(each linked {split['feedback_repeat']}x), then the same threshold and validation. "
        f"Test: {split['test_good_seen']} seen and {split['test_good_unseen']} unseen good test images, "
        f"each with all {split['defective']} defective test images.  ",
        "`FPR @ 95 % recall` is read off each test split itself (an oracle operating point); "
        "the conformal columns use the threshold fixed beforehand on the calibration images. The promise "
        "holds for new good images *from the calibration images' conditions* (seen) in expectation; "
        "unseen conditions are where it may fail.", "",
        table(rows, args.target_fpr)])
    (out / "results.json").write_text(json.dumps({"split": split, "rows": rows, "seconds": seconds}, indent=2))
    print(text)
    if not args.no_report:
        replace_section(args.report, START, END, text)


if __name__ == "__main__":
    main()
