"""Speed of scoring: images/s and ms/image of the model alone and of `anom infer` end to end.

    python scripts/bench_speed.py                    # the table for docs/BENCHMARKS.md (quiet cores: 10-16 min on 2)
    python scripts/bench_speed.py --quick            # a smoke run with tiny models (seconds)
    python scripts/bench_speed.py --model-only --json  # one JSON object per line, for other tools
    python scripts/bench_speed.py --profile ...      # first, where each model's fp32 predict spends its time

Rows: Dinomaly with DINOv2 ViT-S/14 at 392 px, Dinomaly with EfficientNet-Lite0 at 256 px and
PatchCore with EfficientNet-Lite0 at 256 px (a memory bank of the size 200 training images give),
at batch sizes 1, 8 and 32, in fp32 and in the reduced precision the device offers (bf16 on a CPU,
fp16 on CUDA), and on a CPU also as the `anom export` ONNX graph run by onnxruntime (fp32). Weights are random: speed does not depend on them. Each row also gives the
model's FLOPs per image (torch.utils.flop_counter) and the share of the machine's measured peak
matmul throughput (same precision) that the model reaches.

When anomalib is importable (a benchmark environment only: `make bench-speed` installs it into
.venv-bench; it is never a dependency of anomcli), anomalib's DinomalyModel with the same encoder
and input size is timed side by side, after checking that, with the same weights, it gives our
scores in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks_doc import cpu_name  # noqa: E402  (this folder)
from anomcli.cli import config_dir  # noqa: E402
from anomcli.config import register_schemas  # noqa: E402
from anomcli.engine.checkpoint import save_checkpoint  # noqa: E402
from anomcli.engine.evaluate import autocast, prepare_for_inference, uses_channels_last  # noqa: E402
from anomcli.engine.progress import results  # noqa: E402

# Model rows: name -> overrides of `anom train` that build it (random weights, no download)
MODELS = {
    "dinomaly_vits14": ["model.encoder.pretrained=false"],
    "dinomaly_lite0": ["model/encoder=efficientnet_lite0", "model.encoder.pretrained=false"],
    "patchcore_lite0": ["model=patchcore", "model.encoder.pretrained=false"],
}
QUICK_MODELS = {
    "dinomaly_tiny": ["model/encoder=tiny"],
    "patchcore_tiny": ["model=patchcore", "model.encoder.pretrained=false", "model.encoder.input_size=64"],
}
# PatchCore's bank holds coreset_ratio of the patch features of this many training images
BANK_TRAIN_IMAGES = 200
# end-to-end inputs: line-scan strips, decoded and resized by the loader as real coil images are
STRIP_SIZE = (1024, 256)  # width, height


def compose_task(task: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=task, overrides=overrides)


@dataclass
class Row:
    impl: str
    model: str
    encoder: str
    input_size: int
    batch: int
    precision: str
    mode: str  # "model" (forward on a ready batch) or "end_to_end" (anom infer: decode -> predictions.jsonl)
    images_per_s: float
    ms_per_image: float
    gflops_per_image: float
    peak_gflops: float
    fraction_of_peak: float
    device: str
    threads: int


def build(name: str, overrides: list[str]):
    cfg = compose_task("train", overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    if hasattr(model, "memory_bank"):
        grid = model.encoder.grid_size
        rows = int(BANK_TRAIN_IMAGES * grid * grid * model.coreset_ratio)
        model.memory_bank = torch.randn(rows, model.memory_bank.shape[1])
    return cfg, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, *, min_seconds: float, min_calls: int, device: torch.device) -> float:
    """Seconds per call: one untimed warm-up, then calls until both minimums are met."""
    fn()
    synchronize(device)
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    synchronize(device)
    return (time.perf_counter() - started) / calls


def peak_matmul_gflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Best of a few square matmuls: what this machine's matmul kernels reach at this precision
    (int8: int8 x int8 -> int32, the kernel behind dynamically quantised linear layers)."""
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (size, size), dtype=dtype, device=device)
        b = torch.randint(-128, 128, (size, size), dtype=dtype, device=device)
        matmul = torch._int_mm
    else:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        matmul = torch.matmul
    matmul(a, b)
    best = math.inf
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def flops_per_image(predict, side: int, device: torch.device) -> float:
    images = torch.rand(1, 3, side, side, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        predict(images)
    return counter.get_total_flops()


def print_profile(name: str, overrides: list[str], batch: int, device: torch.device) -> None:
    """Where one fp32 `predict` of `batch` images spends its time, by operator (stderr)."""
    _, model = build(name, overrides)
    run_model = prepare_for_inference(model, device)
    images = torch.rand(batch, 3, model.input_size, model.input_size, device=device)
    with torch.inference_mode():
        run_model(images)  # warm-up
        with torch.profiler.profile() as profiler:
            run_model(images)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(f"{name}, batch {batch}, fp32: one predict call by operator\n{table}", file=sys.stderr)


def model_rows(name: str, overrides: list[str], args, device, peaks) -> list[Row]:
    cfg, model = build(name, overrides)
    memory_format = torch.channels_last if uses_channels_last(model) else torch.contiguous_format
    side = model.input_size
    # counted on the float model: int8 runs the same multiply-adds
    gflops = flops_per_image(prepare_for_inference(model, device), side, device) / 1e9
    rows = []
    for precision in args.precisions:
        run_model = prepare_for_inference(model, device, precision=precision)
        for batch in args.batches:
            images = torch.rand(batch, 3, side, side, device=device).contiguous(memory_format=memory_format)

            def call():
                with torch.inference_mode(), autocast(device, precision):
                    run_model(images)

            seconds = time_calls(call, min_seconds=args.min_seconds, min_calls=1, device=device)
            rows.append(make_row("anomcli", name, cfg.model.encoder.model_name, side, batch, precision, "model",
                                 batch / seconds, gflops, peaks[precision], device))
    return rows


def onnxruntime_rows(name: str, overrides: list[str], args, device, peaks, workdir: Path) -> list[Row]:
    """The same model exported by `anom export` and run by onnxruntime (CPU, fp32; parity is tested)."""
    try:
        from anomcli.engine.export import export_onnx, onnx_session, run_onnx
        session_options = __import__("onnxruntime").SessionOptions()
    except ImportError:
        logging.warning("onnxruntime is not installed: no onnxruntime rows (pip install 'anomcli[export]')")
        return []
    cfg, model = build(name, overrides)
    side = model.input_size
    gflops = flops_per_image(model.predict, side, torch.device("cpu")) / 1e9
    if args.threads:
        session_options.intra_op_num_threads = args.threads
    session = onnx_session(export_onnx(model, workdir / f"{name}.onnx"), session_options)
    rows = []
    for batch in args.batches:
        images = np.random.default_rng(0).random((batch, 3, side, side), dtype=np.float32)
        seconds = time_calls(lambda: run_onnx(session, images), min_seconds=args.min_seconds, min_calls=1,
                             device=torch.device("cpu"))
        rows.append(make_row("anomcli-onnxruntime", name, cfg.model.encoder.model_name, side, batch, "fp32",
                             "model", batch / seconds, gflops, peaks["fp32"], torch.device("cpu")))
    return rows


def end_to_end_rows(name: str, overrides: list[str], args, device, peaks, workdir: Path) -> list[Row]:
    """`anom infer` on freshly written PNG strips: decode, resize, score, write predictions.jsonl."""
    from anomcli.tasks import infer

    cfg, model = build(name, overrides)
    side = model.input_size
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir / name)
    checkpoint = save_checkpoint(workdir / name / "checkpoint", model, cfg, {
        "model": type(model).__name__.lower(), "input_size": side, "encoder_pretrained": False})
    gflops = flops_per_image(prepare_for_inference(model, device), side, device) / 1e9
    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            count = max(args.e2e_images, 2 * batch)
            images = write_strips(workdir / "strips" / str(count), count)
            infer_cfg = compose_task("infer", [f"ckpt={checkpoint}", f"input={images}", "heatmaps=none",
                                               f"batch_size={batch}", f"num_workers={args.workers}",
                                               f"device={device}", f"precision={precision}"])
            with open_dict(infer_cfg):
                infer_cfg.paths.output_dir = str(workdir / name / f"infer_{precision}_{batch}")
            results.quiet = True  # infer's summary table would mix into this script's stdout
            try:
                infer.run(infer_cfg)  # warm-up: page cache, allocator, first-call kernels
                started = time.perf_counter()
                infer.run(infer_cfg)
                seconds = time.perf_counter() - started
            finally:
                results.quiet = False
            rows.append(make_row("anomcli", name, cfg.model.encoder.model_name, side, batch, precision,
                                 "end_to_end", count / seconds, gflops, peaks[precision], device))
    return rows


def write_strips(folder: Path, count: int) -> Path:
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    width, height = STRIP_SIZE
    for index in range(count):
        grey = (0.6 + 0.05 * generator.standard_normal((height, width))).clip(0, 1)
        Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB").save(folder / f"strip_{index:04d}.png")
    return folder


def make_row(impl, model, encoder, side, batch, precision, mode, images_per_s, gflops, peak, device) -> Row:
    return Row(impl=impl, model=model, encoder=encoder, input_size=side, batch=batch, precision=precision,
               mode=mode, images_per_s=round(images_per_s, 3), ms_per_image=round(1000 / images_per_s, 2),
               gflops_per_image=round(gflops, 2), peak_gflops=round(peak, 1),
               fraction_of_peak=round(gflops * images_per_s / peak, 4), device=device_name(device),
               threads=torch.get_num_threads())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} x{os.cpu_count()}"


# --- anomalib, side by side ------------------------------------------------------------

def anomalib_rows(args, device, peaks) -> list[Row]:
    """anomalib's DinomalyModel (ViT-S/14 at 392 px), if importable; its scores are checked against ours."""
    try:
        from anomalib_dinomaly import build_anomalib_dinomaly, compare, copy_weights_into_anomalib
    except ImportError as error:
        logging.warning("anomalib is not installed here (%s): no side-by-side row; `make bench-speed` "
                        "runs this script in .venv-bench, which has it", error)
        return []
    cfg, ours = build("dinomaly_vits14", MODELS["dinomaly_vits14"])
    try:
        theirs = build_anomalib_dinomaly(ours.input_size)
    except ImportError as error:
        logging.warning("anomalib is not installed here (%s): no side-by-side row; `make bench-speed` "
                        "runs this script in .venv-bench, which has it", error)
        return []
    copy_weights_into_anomalib(ours, theirs)
    ours.to(device).eval()
    theirs.to(device).eval()
    check = compare(ours, theirs, torch.rand(2, 3, ours.input_size, ours.input_size, device=device))
    logging.warning("anomalib DinomalyModel vs anomcli, same weights, fp32: max |un-smoothed map difference| "
                    "%.2e, max |score difference| under the same post-processing %.2e (scores up to %.3f)",
                    check["raw_map_max_abs_diff"], check["score_max_abs_diff"], check["score_scale"])
    gflops = flops_per_image(lambda x: theirs(x), ours.input_size, device) / 1e9
    rows = []
    for batch in args.batches:
        images = torch.rand(batch, 3, ours.input_size, ours.input_size, device=device)

        def call():
            with torch.inference_mode():
                theirs(images)

        seconds = time_calls(call, min_seconds=args.min_seconds, min_calls=1, device=device)
        rows.append(make_row("anomalib", "dinomaly_vits14", cfg.model.encoder.model_name, ours.input_size, batch,
                             "fp32", "model", batch / seconds, gflops, peaks["fp32"], device))
    return rows


# --- output ----------------------------------------------------------------------------

def print_table(rows: list[Row]) -> None:
    header = ("impl", "model", "input", "batch", "precision", "mode", "images/s", "ms/image", "GFLOPs/img",
              "% of peak")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r.impl} | {r.model} | {r.input_size} | {r.batch} | {r.precision} | {r.mode} | "
              f"{r.images_per_s:.2f} | {r.ms_per_image:.1f} | {r.gflops_per_image:.1f} | "
              f"{100 * r.fraction_of_peak:.1f} |")
    reference = {(r.batch): r.images_per_s for r in rows if r.impl == "anomalib"}
    for r in rows:
        if r.impl == "anomcli" and r.model == "dinomaly_vits14" and r.mode == "model" and r.batch in reference:
            print(f"dinomaly_vits14 batch {r.batch} {r.precision}: {r.images_per_s / reference[r.batch]:.2f}x "
                  "anomalib's images/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 1 and 2: a smoke run in seconds")
    parser.add_argument("--model-only", action="store_true", help="skip the end-to-end `anom infer` rows")
    parser.add_argument("--json", action="store_true", help="one JSON object per row on stdout, no table")
    parser.add_argument("--models", nargs="*", help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (default 1 8 32)")
    parser.add_argument("--precisions", nargs="*", help="fp32, bf16 and int8 on CPU, fp32 and fp16 on CUDA (default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the end-to-end rows")
    parser.add_argument("--min-seconds", type=float, default=None, help="time each row at least this long")
    parser.add_argument("--e2e-images", type=int, default=None, help="images per end-to-end row (at least 2 batches)")
    parser.add_argument("--no-anomalib", action="store_true", help="skip the side-by-side anomalib row")
    parser.add_argument("--profile", action="store_true",
                        help="first print, per model, where one fp32 predict at the first batch size spends its time")
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the exported ONNX graph with onnxruntime (CPU, fp32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("anomcli").setLevel(logging.ERROR)  # random-weight warnings: expected here

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    models = QUICK_MODELS if args.quick else MODELS
    if args.models:
        unknown = set(args.models) - set(models)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(models)}")
        models = {name: models[name] for name in args.models}
    args.batches = args.batches or ([1, 2] if args.quick else [1, 8, 32])
    args.precisions = args.precisions or (["fp32", "fp16"] if device.type == "cuda" else ["fp32", "bf16", "int8"])
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (0.0 if args.quick else 2.0)
    args.e2e_images = args.e2e_images or (4 if args.quick else 32)

    peak_size = 512 if args.quick else 2048
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
    peaks = {p: peak_matmul_gflops(device, dtypes[p], peak_size) for p in args.precisions}
    if args.profile:
        for name, overrides in models.items():
            print_profile(name, overrides, args.batches[0], device)
    rows: list[Row] = []
    for name, overrides in models.items():
        rows += model_rows(name, overrides, args, device, peaks)
    if not args.quick and not args.no_anomalib and "dinomaly_vits14" in models:
        rows += anomalib_rows(args, device, peaks)
    with tempfile.TemporaryDirectory() as workdir:
        if args.onnx and device.type == "cpu" and "fp32" in peaks:
            for name, overrides in models.items():
                rows += onnxruntime_rows(name, overrides, args, device, peaks, Path(workdir))
        if not args.model_only:
            for name, overrides in models.items():
                rows += end_to_end_rows(name, overrides, args, device, peaks, Path(workdir))

    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    else:
        print(f"device: {device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              + ", ".join(f"peak {p} matmul {g:.0f} GFLOP/s" for p, g in peaks.items()))
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
