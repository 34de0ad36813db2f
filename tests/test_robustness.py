"""Bad input, wrong use, interruption and untrusted files, on a corpus this module generates itself."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image
from safetensors.torch import load_file, save_file

import anomcli
from anomcli.data.datamodule import DatasetLayoutError
from anomcli.engine import checkpoint as checkpoint_io
from anomcli.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from anomcli.model.encoder import EncoderWeightsError, create_encoder_model
from anomcli.tasks import infer, train, validate
from anomcli.tasks.common import UsageError, safe_output_path

from .helpers import REPO, compose_task, run_cli, tiny_data_overrides

TRAIN = ["model/encoder=tiny", "trainer.warmup_steps=2", "trainer.stats_images=8", "trainer.device=cpu"]


def _train_cfg(tiny_coils: Path, run_dir: Path, *overrides: str):
    cfg = compose_task("train", [*TRAIN, *tiny_data_overrides(tiny_coils), *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_coils, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("robust") / "train"
    return Path(train.run(_train_cfg(tiny_coils, run_dir, "trainer.max_steps=4", "trainer.save_every=2"))["checkpoint"])


def _infer_cfg(checkpoint: Path, input_path: Path, run_dir: Path, *overrides: str):
    cfg = compose_task("infer", [f"ckpt={checkpoint}", f"input={input_path}", "device=cpu", "num_workers=0",
                                 "batch_size=4", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


# --- the corpus ------------------------------------------------------------------------------

def _noise(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


def _truncated(image: Image.Image, path: Path) -> None:
    image.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb(path: Path, side: int = 40_000) -> None:
    """A valid 1-bit PNG of side x side pixels (1.6 gigapixels) in a few hundred kilobytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b""))


# file name -> the start of the reason it is skipped for; None: it is scored
CORPUS = {
    "ok/plain.png": None,
    "ok/with spaces in name.png": None,
    "ok/naïve_日本語.png": None,
    "ok/sixteen_bit.tif": None,
    "ok/float.tif": None,
    "ok/cmyk.jpg": None,
    "ok/palette.png": None,
    "ok/rgba.png": None,
    "ok/one_pixel.png": None,
    "ok/wide_2000x3.png": None,
    "ok/tall_3x2000.png": None,
    "line a/dup.png": None,
    "line b/dup.png": None,
    "same/part.png": None,
    "same/part.jpg": None,
    "bad/truncated.jpg": "truncated or corrupt JPEG",
    "bad/truncated.png": "truncated or corrupt PNG",
    "bad/empty.png": "empty file (0 bytes)",
    "bad/report.jpg": "not an image (unrecognised format)",
    "bad/bomb.png": "image too large: 40000x40000 pixels",
    "bad/broken_link.png": "broken symbolic link",
    "bad/pipe.png": "not a regular file",
    os.fsdecode(b"bad/caf\xe9 latin-1.png"): "empty file (0 bytes)",  # a name that is not UTF-8
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "incoming line 3"
    for name in CORPUS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    for name in ("ok/plain.png", "ok/with spaces in name.png", "ok/naïve_日本語.png", "line a/dup.png",
                 "line b/dup.png", "same/part.png", "same/part.jpg"):
        _noise(48, 64, seed=len(name)).save(root / name)
    Image.fromarray(np.random.default_rng(1).integers(0, 65536, (40, 50), dtype=np.uint16)).save(
        root / "ok/sixteen_bit.tif")
    Image.fromarray(np.random.default_rng(2).normal(0, 5, (40, 50)).astype(np.float32)).save(root / "ok/float.tif")
    _noise(40, 50, "CMYK").save(root / "ok/cmyk.jpg")
    _noise(40, 50).convert("P").save(root / "ok/palette.png")
    _noise(40, 50, "RGBA").save(root / "ok/rgba.png")
    Image.new("RGB", (1, 1), (90, 90, 90)).save(root / "ok/one_pixel.png")
    _noise(3, 2000).save(root / "ok/wide_2000x3.png")
    _noise(2000, 3).save(root / "ok/tall_3x2000.png")
    _truncated(_noise(64, 64), root / "bad/truncated.jpg")
    _truncated(_noise(64, 64), root / "bad/truncated.png")
    (root / "bad/empty.png").touch()
    (root / os.fsdecode(b"bad/caf\xe9 latin-1.png")).touch()
    (root / "bad/report.jpg").write_text("shift report: line 3 stopped at 04:10\n")
    _bomb(root / "bad/bomb.png")
    (root / "bad/broken_link.png").symlink_to(root / "bad/gone.png")
    os.mkfifo(root / "bad/pipe.png")
    (root / "empty folder").mkdir()
    return root


def test_infer_scores_what_it_can_and_says_why_for_the_rest(checkpoint_dir, corpus, tmp_path):
    run_dir = tmp_path / "infer"
    summary = infer.run(_infer_cfg(checkpoint_dir, corpus, run_dir, "threshold=-1", "heatmaps=all"))
    lines = {Path(line["path"]).relative_to(corpus).as_posix(): line for line in _lines(run_dir)}
    assert set(lines) == set(CORPUS)  # every file has exactly one line
    for name, reason in CORPUS.items():
        line = lines[name]
        if reason is None:
            assert np.isfinite(line["score"]) and line["is_anomalous"] is True, name
        else:
            assert line["score"] is None and line["error"].startswith(reason), (name, line["error"])
            assert "\n" not in line["error"]
    skipped = sum(reason is not None for reason in CORPUS.values())
    assert summary["scored"] == len(CORPUS) - skipped and summary["skipped"] == skipped
    assert {Path(item["path"]).name for item in summary["skipped_files"]} == \
        {Path(name).name for name, reason in CORPUS.items() if reason}

    # one heatmap per scored file, none overwriting another, all inside the run folder
    heatmaps = [Path(line["heatmap"]) for line in lines.values() if line["score"] is not None]
    assert len(set(heatmaps)) == len(heatmaps) == len(CORPUS) - skipped
    assert all(path.is_file() and path.resolve().is_relative_to(run_dir.resolve()) for path in heatmaps)
    assert Path(lines["line a/dup.png"]["heatmap"]) == run_dir / "heatmaps" / "line a" / "dup.png"
    # part.jpg sorts first and keeps the plain name; part.png, next to it, gets its extension added
    assert [Path(lines[f"same/part.{ext}"]["heatmap"]).name for ext in ("jpg", "png")] == ["part.png", "part_png.png"]
    assert Image.open(lines["ok/naïve_日本語.png"]["heatmap"]).size == (64, 48)  # the original image size


def test_infer_exit_codes_through_the_cli(checkpoint_dir, corpus, tmp_path):
    some = run_cli("infer", f"ckpt={checkpoint_dir}", f"input={corpus}", "heatmaps=none",
                   f"hydra.run.dir={tmp_path / 'some'}", check=False)
    assert some.returncode == 0, some.stderr[-2000:]
    assert "skipped" in some.stdout and "bomb.png" in some.stdout
    nothing = run_cli("infer", f"ckpt={checkpoint_dir}", f"input={corpus / 'bad'}",
                      f"hydra.run.dir={tmp_path / 'none'}", check=False)
    assert nothing.returncode == 3 and "none of the 8 input files could be scored" in nothing.stderr
    assert "caf\ufffd latin-1.png" in nothing.stdout  # listed, readable, without failing the terminal
    empty = run_cli("infer", f"ckpt={checkpoint_dir}", f"input={corpus / 'empty folder'}",
                    f"hydra.run.dir={tmp_path / 'empty'}", check=False)
    assert empty.returncode == 3 and "no image files under" in empty.stderr
    wrong_type = run_cli("infer", f"ckpt={checkpoint_dir}", f"input={corpus}", "batch_size=many", check=False)
    assert wrong_type.returncode == 2 and "batch_size" in wrong_type.stderr
    wrong_type = run_cli("train", "trainer.max_steps=lots", check=False)
    assert wrong_type.returncode == 2 and "max_steps" in wrong_type.stderr
    for result in (some, nothing, empty, wrong_type):
        assert "Traceback" not in result.stderr


# --- output paths ----------------------------------------------------------------------------

def test_output_names_are_distinct_and_stay_inside_the_run_folder(tmp_path):
    root = tmp_path / "in"
    files = [root / "a.png", root / "a.jpg", root / "A.PNG", root / "s" / "a.png", root / "a_jpg.png"]
    names = infer.heatmap_names(files, root)
    assert len({str(n).casefold() for n in names}) == len(files)
    assert names[0] == Path("a.png") and names[3] == Path("s/a.png")
    # a file outside the root (a symlinked input) keeps its own name only
    assert infer.heatmap_names([tmp_path / "elsewhere" / "x.png"], root) == [Path("x.png")]

    base = tmp_path / "run" / "heatmaps"
    base.mkdir(parents=True)
    assert safe_output_path(base, Path("s/a.png")) == base / "s" / "a.png"
    (base / "link").symlink_to(tmp_path, target_is_directory=True)
    for escaping in (Path("../../etc/passwd"), Path("/etc/passwd"), Path("link/outside.png")):
        with pytest.raises(UsageError, match="leads outside"):
            safe_output_path(base, escaping)


# --- interruption: infer ---------------------------------------------------------------------

def test_infer_resume_scores_only_what_is_missing(checkpoint_dir, tiny_coils, tmp_path, monkeypatch):
    images = tiny_coils / "test" / "good"
    full_dir, run_dir = tmp_path / "full", tmp_path / "resumed"
    infer.run(_infer_cfg(checkpoint_dir, images, full_dir, "heatmaps=none"))
    full = {line["path"]: line["score"] for line in _lines(full_dir)}

    # a run killed after 2 files, mid-way through writing the third line
    infer.run(_infer_cfg(checkpoint_dir, images, run_dir, "heatmaps=none"))
    kept = (run_dir / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "predictions.jsonl").write_text("".join(kept[:2]) + kept[2][:15])

    scored_now = []
    real_predict = infer.predict

    def recording_predict(model, loader, *args, **kwargs):
        scored_now.extend(sample.path for sample in loader.dataset.samples)
        return real_predict(model, loader, *args, **kwargs)

    monkeypatch.setattr(infer, "predict", recording_predict)
    summary = infer.run(_infer_cfg(checkpoint_dir, images, run_dir, "heatmaps=none", "resume=true"))
    assert summary["already_scored"] == 2 and summary["scored"] == len(full)
    assert sorted(map(str, scored_now)) == sorted(set(full) - {json.loads(line)["path"] for line in kept[:2]})
    resumed = {line["path"]: line["score"] for line in _lines(run_dir)}
    assert len(_lines(run_dir)) == len(full)  # no duplicate and no half line
    assert resumed == pytest.approx(full, abs=1e-5)

    with pytest.raises(UsageError, match="another threshold"):
        infer.run(_infer_cfg(checkpoint_dir, images, run_dir, "heatmaps=none", "resume=true", "threshold=0.5"))


# --- interruption: train ---------------------------------------------------------------------

@pytest.mark.parametrize("kill_at", ["writing weights", "moving the old folder aside", "moving the new folder in"])
def test_a_save_killed_at_any_point_leaves_a_complete_checkpoint(checkpoint_dir, tmp_path, monkeypatch, kill_at):
    folder = tmp_path / "run" / "checkpoint"
    shutil.copytree(checkpoint_dir, folder)
    before = load_checkpoint(folder)
    real_replace, replaced = os.replace, []

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    def replace_then_kill(source, target):
        replaced.append(target)
        if len(replaced) == {"moving the old folder aside": 1, "moving the new folder in": 2}[kill_at]:
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    if kill_at == "writing weights":
        monkeypatch.setattr(checkpoint_io, "save_file", killed)
    else:
        monkeypatch.setattr(checkpoint_io.os, "replace", replace_then_kill)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, before.model, before.config, {**before.meta, "trainer_step": 99})
    monkeypatch.undo()

    after = load_checkpoint(folder)  # the last complete save, wherever the kill landed
    assert after.meta["trainer_step"] == before.meta["trainer_step"]
    assert after.meta["checkpoint_id"] == before.meta["checkpoint_id"]
    # the next save completes and tidies what the killed one left
    save_checkpoint(folder, after.model, after.config, {**after.meta, "trainer_step": 7})
    assert load_checkpoint(folder).meta["trainer_step"] == 7
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]


def test_train_killed_with_sigkill_leaves_a_checkpoint_that_loads_and_resumes(tiny_coils, tmp_path):
    run_dir = tmp_path / "train"
    meta = run_dir / "checkpoint" / "meta.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "anomcli", "train", *TRAIN, "trainer.max_steps=100000", "trainer.save_every=1",
         *tiny_data_overrides(tiny_coils), f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    try:
        while process.poll() is None and time.monotonic() < deadline:
            try:  # kill as soon as a few saves have happened: mid-run, likely mid-save
                if json.loads(meta.read_text()).get("trainer_step", 0) >= 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        assert process.poll() is None, "training ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()

    saved = load_checkpoint(run_dir / "checkpoint")
    step = saved.meta["trainer_step"]
    assert step >= 3
    cfg = _train_cfg(tiny_coils, run_dir, f"trainer.max_steps={step + 2}", "trainer.resume=true")
    assert train.run(cfg)["steps"] == step + 2


@pytest.mark.parametrize("cache_encoder", [True, False], ids=["cached-taps", "images"])
def test_resume_matches_an_uninterrupted_run(tiny_coils, tmp_path, monkeypatch, cache_encoder):
    steps = ["trainer.max_steps=8", "trainer.save_every=4", "trainer.log_every=1",
             f"trainer.cache_encoder={cache_encoder}"]
    uninterrupted = load_checkpoint(train.run(_train_cfg(tiny_coils, tmp_path / "a", *steps))["checkpoint"])

    from anomcli.engine import fit as fit_module
    real_fraction = fit_module.hard_mining_fraction

    def preempted(step, **kwargs):
        if step == 4:  # right after the checkpoint of step 4
            raise KeyboardInterrupt("pre-empted")
        return real_fraction(step, **kwargs)

    monkeypatch.setattr(fit_module, "hard_mining_fraction", preempted)
    with pytest.raises(KeyboardInterrupt):
        train.run(_train_cfg(tiny_coils, tmp_path / "b", *steps))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "checkpoint").meta["trainer_step"] == 4
    resumed = load_checkpoint(train.run(_train_cfg(tiny_coils, tmp_path / "b", *steps, "trainer.resume=true"))
                              ["checkpoint"])
    assert resumed.meta["trainer_step"] == 8
    # same batches, same dropout noise, same optimiser state: the same weights (a tolerance for other hardware)
    uninterrupted_weights = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, uninterrupted_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.meta["final_loss"] == pytest.approx(uninterrupted.meta["final_loss"], rel=1e-5)
    assert resumed.meta["train_statistics"]["score"] == pytest.approx(
        uninterrupted.meta["train_statistics"]["score"], rel=1e-5)


# --- wrong use -------------------------------------------------------------------------------

def _copy(checkpoint_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint_dir, tmp_path / "checkpoint"))


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("damage, message", [
    ("missing folder", "does not exist"),
    ("no weights", "incomplete: missing model.safetensors"),
    ("truncated weights", "not a readable safetensors file"),
    ("weights of another save", "come from different saves"),
    ("config edited", "does not fit the model config.yaml describes"),
    ("config of another model", "meta.json is from a dinomaly model but config.yaml builds a patchcore"),
    ("config unreadable", "cannot read"),
    ("config with an unknown argument", "cannot rebuild the model"),
    ("newer format", "upgrade anomcli"),
    ("newer package series", "upgrade anomcli to 0.9.0 or later"),
    ("not a checkpoint", "is not an anomcli checkpoint"),
])
def test_broken_checkpoints_fail_early_with_what_to_do(checkpoint_dir, tmp_path, damage, message):
    folder = _copy(checkpoint_dir, tmp_path)
    config = OmegaConf.load(folder / "config.yaml")
    if damage == "missing folder":
        shutil.rmtree(folder)
    elif damage == "no weights":
        (folder / "model.safetensors").unlink()
    elif damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "weights of another save":
        other = save_checkpoint(tmp_path / "other", load_checkpoint(folder).model, config, {"trainer_step": 1})
        shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    elif damage == "config edited":
        config.model.bottleneck.hidden_ratio = 2.0
        OmegaConf.save(config, folder / "config.yaml")
    elif damage == "config of another model":
        config.model = {"_target_": "anomcli.model.patchcore.PatchCore", "encoder": config.model.encoder}
        OmegaConf.save(config, folder / "config.yaml")
    elif damage == "config unreadable":
        (folder / "config.yaml").write_text("model: [unclosed\n")
    elif damage == "config with an unknown argument":
        config.model.decoder.sparkle = 1
        OmegaConf.save(config, folder / "config.yaml")
    elif damage == "newer format":
        _edit_meta(folder, format_version=checkpoint_io.FORMAT_VERSION + 1)
    elif damage == "newer package series":
        _edit_meta(folder, anomcli_version="0.9.0")
    elif damage == "not a checkpoint":
        _edit_meta(folder, format="something-else")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_patch_release_of_the_same_series_loads_with_a_warning(checkpoint_dir, tmp_path, caplog):
    folder = _copy(checkpoint_dir, tmp_path)
    major, minor, *_ = anomcli.__version__.split(".")
    _edit_meta(folder, anomcli_version=f"{major}.{minor}.99")
    assert load_checkpoint(folder).meta["anomcli_version"] == f"{major}.{minor}.99"
    assert "written by anomcli" in caplog.text


def test_a_data_root_without_train_good_fails_before_training(tiny_coils, tmp_path):
    cfg = compose_task("train", [*TRAIN, "data=folder", f"data.root={tmp_path}", "data.num_workers=0"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(DatasetLayoutError, match="train/good"):
        train.run(cfg)


def test_a_mask_of_another_size_fails_before_scoring(checkpoint_dir, tiny_coils, tmp_path, monkeypatch):
    data = Path(shutil.copytree(tiny_coils, tmp_path / "data"))
    mask = sorted((data / "ground_truth" / "scratch").iterdir())[0]
    Image.new("L", (33, 17)).save(mask)
    monkeypatch.setattr("anomcli.tasks.common.predict", lambda *a, **k: pytest.fail("scored before checking masks"))
    cfg = compose_task("validate", [f"ckpt={checkpoint_dir}", f"data.root={data}", "device=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "validate")
    with pytest.raises(DatasetLayoutError) as error:
        validate.run(cfg)
    assert "is 33x17 but its image" in str(error.value) and "96x64" in str(error.value)


def test_validate_keeps_heatmaps_of_same_named_images_apart(checkpoint_dir, tiny_coils, tmp_path):
    data = Path(shutil.copytree(tiny_coils, tmp_path / "data"))
    first = sorted((data / "test" / "good").glob("*.png"))[0]
    Image.open(first).save(first.with_suffix(".jpg"))  # good/000.png and good/000.jpg
    cfg = compose_task("validate", [f"ckpt={checkpoint_dir}", f"data.root={data}", "device=cpu", "heatmaps=all"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "validate")
    validate.run(cfg)
    heatmaps = tmp_path / "validate" / "heatmaps" / "good"
    assert len(list(heatmaps.glob(f"{first.stem}*.png"))) == 2  # 000.png and 000_jpg.png (or _png)


# --- untrusted files -------------------------------------------------------------------------

class _Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _malicious_state_dict(model: torch.nn.Module, marker: Path) -> dict:
    return {**model.state_dict(), "payload": _Payload(marker)}


def test_malicious_pickled_encoder_weights_are_refused_not_executed(tmp_path):
    import timm

    tiny = dict(img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    marker = tmp_path / "marker"
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_malicious_state_dict(timm.create_model("vit_small_patch14_reg4_dinov2", **tiny), marker), path)
    with pytest.raises(EncoderWeightsError, match="refusing .* pickled objects"):
        create_encoder_model("vit_small_patch14_reg4_dinov2", pretrained=True, weights=str(path), **tiny)
    assert not marker.exists()


def test_a_pickle_in_place_of_checkpoint_weights_is_refused_not_executed(checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path)
    marker = tmp_path / "marker"
    weights = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
    torch.save({**weights, "payload": _Payload(marker)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickled PyTorch file"):
        load_checkpoint(folder)
    assert not marker.exists()
    save_file(weights, str(folder / "model.safetensors"))  # the real file loads again
    load_checkpoint(folder)


def test_no_code_path_loads_pickles():
    """torch.load only with weights_only=True; no pickle, no numpy allow_pickle, no torch.load of checkpoints."""
    problems = []
    for source in sorted((REPO / "anomcli").rglob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                    problems.append(f"{source.name}:{node.lineno} {name} without weights_only=True")
                if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.")) and "load" in name:
                    problems.append(f"{source.name}:{node.lineno} {name}")
                if keywords.get("allow_pickle") == "True":
                    problems.append(f"{source.name}:{node.lineno} allow_pickle=True")
    assert not problems, problems
    assert "torch.load" not in (REPO / "anomcli" / "engine" / "checkpoint.py").read_text()


def test_safetensors_whose_first_byte_looks_like_a_pickle_still_load(tmp_path):
    # the first byte of a safetensors file is the low byte of its header length: 0x80 must not read as a pickle
    from safetensors.torch import save_file

    from anomcli.engine.checkpoint import _read_safetensors

    path = tmp_path / "model.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(3)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    torch.testing.assert_close(_read_safetensors(path)["w"], torch.ones(3))
