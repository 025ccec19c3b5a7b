"""``fusion-engine train / evaluate`` end to end on image folders written from digits, with tiny timm
backbones: the JSON and text reports, the feature cache across runs, fine-tuning checkpoints, and
every bad-data case as a clean ``error: ...`` with exit code 2 that leaves an existing RUN_DIR and
the feature cache as they were.

The training run, evaluate and the --resume error go through a real subprocess (``python -m fusion_engine``);
the rest call ``cli.main`` in-process, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from four_digits import four_digits
from PIL import Image
from safetensors.torch import load_file

import fusion_engine
from fusion_engine.cli.main import main

CONFIG = {
    "backbones": [  # tiny models, random on purpose
        {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False},
        {"name": "timm", "model": "test_efficientnet", "input_size": 32, "pretrained": False},
    ],
    "fusion": "concat",
}
BRANCHES = ["timm:test_resnet", "timm:test_efficientnet"]
NAMES = ["zero", "one", "two", "three"]  # a folder's classes are sorted: one, three, two, zero
REPORT_KEYS = ("accuracy", "macro_f1", "n", "branches", "baselines")


def write_folder(root: Path, x, y) -> Path:
    for i, (image, label) in enumerate(zip(x, y)):
        (root / NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / NAMES[label] / f"{i:04d}.png")
    return root


def cli_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_ENGINE_") and k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        FUSION_ENGINE_CACHE_DIR=str(tmp / "default-cache"),
    )
    return env


def run_cli(ws: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusion_engine", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(ws),
        cwd=ws,
        timeout=600,
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Workspace: train/ (120 images) and test/ (40) folders of 4 classes, config.json, cache/."""
    root = tmp_path_factory.mktemp("cli")
    write_folder(root / "train", *four_digits(120))
    write_folder(root / "test", *four_digits(40, offset=120))
    (root / "config.json").write_text(json.dumps(CONFIG))
    return root


def train_args(ws: Path, out, *extra) -> list[str]:
    return [
        "train",
        "--config",
        str(ws / "config.json"),
        "--data",
        str(ws / "train"),
        "--data-test",
        str(ws / "test"),
        "--cache-dir",
        str(ws / "cache"),
        "--epochs",
        "3",
        "-q",
        "--out",
        str(out),
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def trained(ws) -> dict:
    """One ``train --json`` run in a subprocess; its parsed output."""
    proc = run_cli(ws, *train_args(ws, ws / "run", "--json"))
    assert proc.returncode == 0, proc.stderr
    return {"stdout": proc.stdout, "stderr": proc.stderr, "result": json.loads(proc.stdout), "run": ws / "run"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files or folders (``*.tmp``) anywhere under ``folders``."""
    return [p for folder in folders if folder.exists() for p in folder.rglob("*.tmp")]


# --- the round trip ----------------------------------------------------------------------------


def test_train_json_is_one_object_with_fused_branches_and_baselines(trained):
    assert trained["stdout"].strip().count("\n") == 0  # one JSON object; progress and notes go to stderr
    result = trained["result"]
    assert set(REPORT_KEYS) <= set(result)
    assert result["n"] == 40 and 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    assert list(result["branches"]) == BRANCHES
    assert list(result["baselines"]) == ["handcrafted"]
    assert max(result["branches"].values()) > 0.5  # 4 classes: chance is 0.25
    assert result["history"]["cache"]["extracted"] == 4 and result["history"]["cache"]["hits"] == 0
    assert result["run_dir"] == str(trained["run"])
    assert (trained["run"] / "manifest.json").is_file() and (trained["run"] / "model.safetensors").is_file()
    assert not Path(str(trained["run"]) + ".checkpoint").exists()
    assert "Traceback" not in trained["stderr"]
    timing = result["timing"]  # every phase of the run, adding up to its wall time
    assert list(timing["phases"]) == [
        "setup", "data", "extraction", "head", "baselines", "evaluation", "saving", "report", "other"
    ]  # fmt: skip
    assert sum(timing["phases"].values()) == pytest.approx(timing["seconds"], abs=0.001 * len(timing["phases"]))
    assert timing["phases"]["head"] == result["history"]["phase_seconds"]["head"]
    assert not re.search(r"^(extracting|head training|baselines)", trained["stderr"], re.M)  # -q: no progress


def test_evaluate_json_matches_the_training_report(ws, trained):
    proc = run_cli(ws, "evaluate", trained["run"], "--data", ws / "test", "--cache-dir", ws / "cache", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(REPORT_KEYS) <= set(report)
    for key in REPORT_KEYS:
        assert report[key] == trained["result"][key], key


def test_no_baselines_prints_one_line_per_phase_and_a_summary_that_adds_up(ws, trained, capsys):
    args = [a for a in train_args(ws, ws / "run-nb", "--no-baselines") if a != "-q"]
    assert main(args) == 0
    captured = capsys.readouterr()
    # stderr is not a terminal here: each phase's progress is one line at its end; the features are cached,
    # so nothing is extracted but the held-out images at evaluation
    progress = [line for line in captured.err.splitlines() if re.match(r"^[^:]+: \d+/\d+ \w+ in ", line)]
    assert progress == [
        line for line in progress if line.startswith(("head training: 3/3 epoch", "extracting timm:test_resnet"))
    ]
    assert sum(line.startswith("head training") for line in progress) == 1
    assert "baseline handcrafted" not in captured.out and "(probe)" not in captured.out  # the fused model only
    summary = captured.out[captured.out.index("wall time") :].splitlines()
    total = float(re.match(r"wall time ([\d.]+) s:", summary[0])[1])
    phases = {
        m[1].strip(): float(m[2]) for m in (re.match(r"^  (.+?)\s+([\d.]+) s\s+[\d.]+%$", x) for x in summary[1:]) if m
    }
    assert list(phases) == [
        "setup (plugins, config, model)",
        "data loading",
        "feature extraction",
        "head training",
        "evaluation (held-out)",
        "saving RUN_DIR",
        "HTML report",
        "other",
    ]
    assert sum(phases.values()) == pytest.approx(total, abs=0.05 * (len(phases) + 1))  # one decimal each
    assert summary[-1] == f"saved to {ws / 'run-nb'}"
    manifest = json.loads((ws / "run-nb" / "manifest.json").read_text())
    assert not any(k.startswith("baselines.") for k in load_file(ws / "run-nb" / "model.safetensors"))
    assert manifest["history"]["config"]["baselines"] is False


def test_second_run_reads_the_feature_cache_and_trains_the_same_model(ws, trained, capsys):
    assert main(train_args(ws, ws / "run2", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["history"]["cache"] == {"hits": 4, "extracted": 0, "extract_seconds": 0.0}
    for key in REPORT_KEYS:
        assert result[key] == trained["result"][key], key
    first, second = load_file(trained["run"] / "model.safetensors"), load_file(ws / "run2" / "model.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_extract_runtime_bf16_extracts_under_its_own_cache_keys(ws, trained, capsys):
    assert main(train_args(ws, ws / "run-bf16", "--json", "--extract-runtime", "bf16")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["history"]["config"]["extract_runtime"] == "bf16"
    assert result["history"]["cache"]["extracted"] == 4  # the float32 features of `trained` are not reused
    assert abs(result["accuracy"] - trained["result"]["accuracy"]) <= 0.1  # 40 held-out images: 4 may differ


def test_evaluate_text_table_and_classes_mapped_by_name(ws, trained, capsys, tmp_path):
    assert (
        main(["evaluate", str(trained["run"]), "--data", str(ws / "test"), "--cache-dir", str(ws / "cache"), "-q"]) == 0
    )
    table = capsys.readouterr().out
    for row in ["fused model", *(f"branch {b} (probe)" for b in BRANCHES), "baseline handcrafted"]:
        assert row in table
    assert "per-class accuracy: one=" in table

    # The same test images as an .npz whose classes are in another order than the model's (sorted) ones.
    x, y = four_digits(40, offset=120)
    np.savez(tmp_path / "test.npz", x=x, y=y, classes=np.array(NAMES))
    assert (
        main(
            [
                "evaluate",
                str(trained["run"]),
                "--data",
                str(tmp_path / "test.npz"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    for key in REPORT_KEYS:
        assert report[key] == trained["result"][key], key

    other = write_folder(tmp_path / "other", x, (y + 1) % 4)
    shutil.move(other / "zero", other / "seven")
    assert main(["evaluate", str(trained["run"]), "--data", str(other), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert re.search(r"^error: the data's classes .*seven.* differ from the model's", capsys.readouterr().err)


# --- fine-tuning checkpoints -------------------------------------------------------------------


def test_finetune_checkpoints_resumes_after_an_interrupt_and_removes_the_checkpoint(
    ws, trained, tmp_path, capsys, monkeypatch
):
    import fusion_engine.training.finetune as finetune

    finetune_args = ["--mode", "finetune", "--epochs", "2", "--batch-size", "32"]
    seen = []
    original = finetune._save_checkpoint

    def record(folder, *args):
        original(folder, *args)
        seen.append((Path(folder), json.loads((Path(folder) / "state.json").read_text())["epoch"]))

    # Uninterrupted: a checkpoint after each epoch, removed once RUN_DIR is saved.
    monkeypatch.setattr(finetune, "_save_checkpoint", record)
    reference = tmp_path / "reference"
    assert main(train_args(ws, reference, *finetune_args)) == 0
    checkpoint = tmp_path / "reference.checkpoint"
    assert seen == [(checkpoint, 1), (checkpoint, 2)]
    assert not checkpoint.exists() and (reference / "manifest.json").is_file()
    text = capsys.readouterr().out
    assert "epoch 1:" in text and "epoch 2:" in text
    for row in ["fused model", *(f"branch {b} (probe)" for b in BRANCHES), "baseline handcrafted"]:
        assert row in text
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["history"]["mode"] == "finetune" and len(manifest["history"]["epochs"]) == 2

    # Interrupted after epoch 1 while an older model sits in RUN_DIR (given with a trailing slash):
    # RUN_DIR stays as it was, the checkpoint lies beside it, and --resume finishes the same model.
    out = tmp_path / "run"
    shutil.copytree(trained["run"], out)
    before = snapshot(out)

    def save_then_interrupt(*args):
        original(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(ws, str(out) + "/", *finetune_args))
    assert snapshot(out) == before
    assert json.loads((tmp_path / "run.checkpoint" / "state.json").read_text())["epoch"] == 1
    assert not leftovers(tmp_path)
    monkeypatch.setattr(finetune, "_save_checkpoint", original)
    # A later checkpoint save killed between its two renames strands it as .NAME.old-*: --resume puts it back.
    (tmp_path / "run.checkpoint").rename(tmp_path / ".run.checkpoint.old-1-1")
    assert main(train_args(ws, out, *finetune_args, "--resume", "--device", "cpu")) == 0  # the device may change
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert not (tmp_path / "run.checkpoint").exists()
    expected, resumed = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys() and all((expected[k] == resumed[k]).all() for k in expected)


def test_resume_without_a_checkpoint_is_a_clean_error(ws, tmp_path, capsys):
    out = tmp_path / "never"
    proc = run_cli(ws, *train_args(ws, out, "--mode", "finetune", "--epochs", "2", "--resume"))
    assert proc.returncode == 2
    assert re.search(r"^error: --resume: no checkpoint at .*never\.checkpoint", proc.stderr, re.MULTILINE), proc.stderr
    assert "Traceback" not in proc.stderr
    assert main(train_args(ws, out, "--resume")) == 2  # frozen mode keeps no checkpoint
    assert re.search(r"^error: --resume .*--mode finetune", capsys.readouterr().err, re.MULTILINE)
    assert not out.exists()


def interrupted_finetune(ws: Path, out: Path, monkeypatch, *extra) -> Path:
    """A --mode finetune run stopped after its first epoch's checkpoint; returns the checkpoint folder."""
    import fusion_engine.training.finetune as finetune

    original = finetune._save_checkpoint

    def save_then_interrupt(*args):
        original(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(ws, out, "--mode", "finetune", "--epochs", "2", "--batch-size", "32", *extra))
    monkeypatch.setattr(finetune, "_save_checkpoint", original)
    checkpoint = Path(str(out) + ".checkpoint")
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 1
    return checkpoint


def test_resume_refuses_a_different_run_and_says_what_differs(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    checkpoint = interrupted_finetune(ws, out, monkeypatch)
    before = snapshot(checkpoint)
    one_branch = tmp_path / "one.json"
    one_branch.write_text(json.dumps({**CONFIG, "backbones": CONFIG["backbones"][:1]}))
    fewer = write_folder(tmp_path / "fewer", *four_digits(100))
    resume = ["--mode", "finetune", "--epochs", "2", "--batch-size", "32", "--resume"]
    cases = {
        "seed": (["--seed", "1"], r"seed: checkpoint 0, now 1"),
        "epochs": (["--epochs", "3"], r"epochs: checkpoint 2, now 3"),
        "lr": (["--lr", "0.5"], r"lr: checkpoint [0-9.e-]+, now 0\.5"),
        "no-augment": (["--no-augment"], r"augment: checkpoint true, now false"),
        "branches": (
            ["--config", one_branch],
            r'branches: checkpoint \["timm:test_resnet", "timm:test_efficientnet"\], now \["timm:test_resnet"\]',
        ),
        "fusion": (["--fusion", "attention"], r"config\.fusion\.name: checkpoint \"concat\", now \"attention\""),
        "data": (["--data", fewer], r"training data: checkpoint \"[0-9]+ images, digest [0-9a-f]+\", now"),
    }
    for name, (extra, message) in cases.items():
        assert main(train_args(ws, out, *resume, *extra)) == 2, name  # the later of a repeated option wins
        err = capsys.readouterr().err
        assert re.search(r"^error: --resume: the checkpoint at .*run\.checkpoint was written by a different run: ", err)
        assert re.search(message, err), (name, err)
        assert "Traceback" not in err
        assert snapshot(checkpoint) == before and not out.exists()


def test_resume_from_a_damaged_checkpoint_names_the_file(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    checkpoint = interrupted_finetune(ws, out, monkeypatch)
    kept = tmp_path / "kept"
    shutil.copytree(checkpoint, kept)
    damage = {
        "state.json not JSON": ("state.json", b"{not json", r"state\.json is missing or damaged \(not JSON"),
        "state.json no epoch": ("state.json", b"{}", r"state\.json is missing or damaged \(no valid 'epoch'\)"),
        "model truncated": ("model.safetensors", None, r"model\.safetensors is missing or damaged"),
        "optimizer missing": ("optimizer.safetensors", "delete", r"optimizer\.safetensors is missing or damaged"),
        "best garbage": ("best.safetensors", b"\x00" * 64, r"best\.safetensors is missing or damaged"),
    }
    for name, (file, change, message) in damage.items():
        shutil.rmtree(checkpoint)
        shutil.copytree(kept, checkpoint)
        target = checkpoint / file
        if change == "delete":
            target.unlink()
        elif change is None:
            target.write_bytes(target.read_bytes()[:100])
        else:
            target.write_bytes(change)
        assert main(train_args(ws, out, "--mode", "finetune", "--epochs", "2", "--batch-size", "32", "--resume")) == 2
        err = capsys.readouterr().err
        assert re.search(r"^error: checkpoint file .*run\.checkpoint/" + message, err, re.MULTILINE), (name, err)
        assert "start without --resume" in err and "Traceback" not in err
    # A checkpoint that does not say which run wrote it (made before runs were recorded) is not trusted either.
    shutil.rmtree(checkpoint)
    shutil.copytree(kept, checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    del state["run"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    assert main(train_args(ws, out, "--mode", "finetune", "--epochs", "2", "--batch-size", "32", "--resume")) == 2
    assert re.search(r"^error: --resume: the checkpoint at .* does not record which run", capsys.readouterr().err)


# --- --out --------------------------------------------------------------------------------------


def test_out_naming_a_file_is_refused_before_any_data_is_read(ws, tmp_path, capsys, monkeypatch):
    import fusion_engine.cli.train as train_command

    monkeypatch.setattr(
        train_command, "load_train_test", lambda *a: pytest.fail("data loaded before --out was checked")
    )
    (tmp_path / "file").write_text("precious")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    (tmp_path / "run.checkpoint").write_text("not a folder")
    cases = {
        tmp_path / "file": r"--out .*file is a file; RUN_DIR must be a folder \(new or an earlier RUN_DIR\)",
        tmp_path / "link": r"--out .*link is a symbolic link; RUN_DIR must be a folder",
        tmp_path / "file" / "run": r"--out .*file/run: .*file is a file, not a folder",
    }
    for out, message in cases.items():
        assert main(train_args(ws, out)) == 2
        assert re.search("^error: " + message, capsys.readouterr().err, re.MULTILINE), out
        assert main(train_args(ws, out, "--search")) == 2  # --search writes RUN_DIR too
        assert re.search("^error: " + message, capsys.readouterr().err, re.MULTILINE), out
    assert main(train_args(ws, tmp_path / "run", "--mode", "finetune")) == 2
    assert re.search(r"^error: .*run\.checkpoint, where fine-tuning keeps its checkpoint", capsys.readouterr().err)
    assert (tmp_path / "file").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "link", "run.checkpoint"]


# --- bad data ----------------------------------------------------------------------------------


def corrupt_png_data(path: Path) -> None:
    """Garble a PNG's compressed pixels but keep every chunk CRC valid: the file passes the cheap
    integrity check when the data is loaded and fails only when the image is decoded."""
    data, out, pos = path.read_bytes(), bytearray(path.read_bytes()[:8]), 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            body = body[:2] + b"\xff" * (len(body) - 2)
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    path.write_bytes(bytes(out))


def bad_data(kind: str, root: Path) -> Path:
    x, y = four_digits(12)
    if kind.endswith(".npz"):
        path = root / kind
        if kind == "length-mismatch.npz":
            np.savez(path, x=x, y=y[:-1])
        else:
            np.savez(path, x=x, y=np.where(y == 3, 4, y), classes=np.array(NAMES))
        return path
    folder = write_folder(root / kind, x, y)
    first = sorted((folder / "two").iterdir())[0]
    if kind == "unreadable":
        first.write_text("this is not a PNG")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / "two" / "photo.jpg", quality=95
        )
        data = (folder / "two" / "photo.jpg").read_bytes()
        (folder / "two" / "photo.jpg").write_bytes(data[: len(data) // 2])
    elif kind == "empty-class":
        (folder / "five").mkdir()
        (folder / "five" / "README.txt").write_text("no images yet")
    elif kind == "one-class":
        for name in ("one", "three", "two"):
            shutil.rmtree(folder / name)
    return folder


BAD_DATA = {
    "unreadable": r"image file .*\.png is unreadable or corrupt",
    "truncated": r"photo\.jpg is unreadable or corrupt.*truncated",
    "empty-class": r"class folder .*five has no images",
    "one-class": r"1 class sub-folder.*at least two",
    "length-mismatch.npz": r"x has 12 images but y has 11 labels",
    "labels-out-of-range.npz": r"label 4 is out of range; labels must be 0\.\.3",
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_training_data_is_a_clean_error(kind, ws, tmp_path, capsys):
    data = bad_data(kind, tmp_path)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(ws / "config.json"),
            "--data",
            str(data),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--epochs",
            "1",
            "-q",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert re.search("^error: .*" + BAD_DATA[kind], err, re.MULTILINE), err
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_test_data_leaves_an_existing_run_dir_untouched(ws, trained, tmp_path, capsys):
    out = tmp_path / "existing"
    shutil.copytree(trained["run"], out)
    before = snapshot(out)
    args = train_args(ws, out)
    args[args.index("--data-test") + 1] = str(bad_data("truncated", tmp_path))
    assert main(args) == 2
    assert re.search(r"^error: .*photo\.jpg is unreadable", capsys.readouterr().err, re.MULTILINE)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "truncated"]


def test_a_failure_mid_training_leaves_the_run_dir_and_cache_clean(ws, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "existing"
    shutil.copytree(trained["run"], out)
    before = snapshot(out)
    cache = tmp_path / "cache"

    # An image that passes the check at loading time and fails to decode during feature extraction.
    data = tmp_path / "train"
    shutil.copytree(ws / "train", data)
    corrupt_png_data(sorted((data / "two").iterdir())[3])
    args = [
        "train",
        "--config",
        str(ws / "config.json"),
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        "--epochs",
        "2",
        "-q",
        "--out",
        str(out),
    ]
    assert main(args) == 2
    assert re.search(r"^error: cannot read image file .*two.*\.png", capsys.readouterr().err, re.MULTILINE)
    assert snapshot(out) == before
    assert not leftovers(tmp_path) and not list(cache.glob("*.tmp"))

    # Interrupted while the head trains (features already cached): same guarantees.
    import fusion_engine.training.fit as training

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_head", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "train",
                "--config",
                str(ws / "config.json"),
                "--data",
                str(ws / "train"),
                "--cache-dir",
                str(cache),
                "--epochs",
                "2",
                "-q",
                "--out",
                str(out),
            ]
        )
    assert snapshot(out) == before
    assert not leftovers(tmp_path) and list(cache.glob("*.npy"))  # complete cache entries only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "existing", "train"]


# --- honest defaults and CLI polish ------------------------------------------------------------------


def test_random_branches_are_named_in_one_warning_before_training(ws, trained, tmp_path, capsys):
    assert "warning" not in trained["stderr"]  # "pretrained": false: random on purpose, nothing to warn about
    default = {**CONFIG, "backbones": [{k: v for k, v in b.items() if k != "pretrained"} for b in CONFIG["backbones"]]}
    (tmp_path / "default.json").write_text(json.dumps(default))
    args = train_args(ws, tmp_path / "run", "--json", "--epochs", "1")
    args[args.index("--config") + 1] = str(tmp_path / "default.json")
    assert main(args) == 0
    lines = capsys.readouterr().err.splitlines()  # --json: every log line on stderr, in order
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    assert len(warned) == 1, lines
    line = lines[warned[0]]
    assert line.startswith("warning: 2 of 2 branches RANDOMLY INITIALISED") and f"{', '.join(BRANCHES)}." in line
    assert not any("RandomInitWarning" in line for line in lines)  # our one line, not Python's file:line form
    backbones = next(i for i, line in enumerate(lines) if line.startswith("backbones: "))
    assert backbones < warned[0] < len(lines) - 1  # after the config is read, before training and its report


def test_unknown_flag_gets_a_close_match_and_the_commands_short_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--fusoin", "concat"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [
        "usage: fusion-engine train [options]",
        "error: unrecognized argument --fusoin (did you mean '--fusion'?)",
    ]
    assert len(lines) == 3 and "fusion-engine train -h" in lines[2]


def test_invalid_choice_is_short_and_names_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--mode", "frozn"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "usage: fusion-engine train [options]" and len(lines) == 3
    assert re.fullmatch(
        r"error: argument --mode: invalid choice: 'frozn' \(choose from '?frozen'?, '?finetune'?\) "
        r"\(did you mean 'frozen'\?\)",
        lines[1],
    )
    with pytest.raises(SystemExit):
        main(["evaluate"])  # required arguments: the short usage names them
    assert capsys.readouterr().err.splitlines()[0] == "usage: fusion-engine evaluate RUN_DIR --data DATA [options]"


def test_config_is_validated_before_the_data_is_loaded(ws, tmp_path, capsys, monkeypatch):
    import fusion_engine.cli.train as train_command

    monkeypatch.setattr(train_command, "load_train_test", lambda *a: pytest.fail("data loaded before the config"))
    (tmp_path / "typo.json").write_text(json.dumps({**CONFIG, "fusion": "concatt"}))
    args = train_args(ws, tmp_path / "run")
    args[args.index("--config") + 1] = str(tmp_path / "typo.json")
    assert main(args) == 2
    assert re.search(r"^error: .*'concatt' \(did you mean 'concat'\?\)", capsys.readouterr().err, re.MULTILINE)
    assert not (tmp_path / "run").exists()


def test_num_classes_of_the_config_is_not_silently_overridden(ws, tmp_path, capsys):
    (tmp_path / "two.json").write_text(json.dumps({**CONFIG, "num_classes": 2}))
    args = train_args(ws, tmp_path / "run")
    args[args.index("--config") + 1] = str(tmp_path / "two.json")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: the config says num_classes: 2, but the data has 4 classes" in err
    assert not (tmp_path / "run").exists()


def test_search_with_train_blocks_trains_the_winners_tops(tmp_path, capsys):
    """The selection runs on frozen features; the winner's final training trains its top blocks, so fitted fusions
    (stacking) are not candidates and say why."""
    tiny = [
        {"name": "timm", "model": m, "input_size": 32, "pretrained": False}
        for m in ("test_efficientnet", "test_resnet")
    ]
    (tmp_path / "cands.json").write_text(json.dumps({"backbones": tiny, "fusions": ["concat", "stacking"]}))
    run = tmp_path / "run"
    argv = [
        "train",
        "--search",
        "--candidates",
        str(tmp_path / "cands.json"),
        "--train-blocks",
        "1",
        "--data",
        "digits",
    ]
    argv += ["--out", str(run), "--folds", "2", "--search-epochs", "2", "--epochs", "2", "--no-cache", "-q", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["fusion"] for p in out["search"]["fusions"]["invalid"]] == ["stacking", "stacking(C=0.1)"]
    assert "cannot train top blocks" in out["search"]["fusions"]["invalid"][0]["error"]
    model = fusion_engine.load(run)
    assert model.history["config"]["train_blocks"] == 1 and model.history["epochs"]


def test_search_with_independent_branches_keeps_fusions_with_a_head_per_branch(tmp_path, capsys):
    """Independent branches need a head per branch: the search screens and selects with vote, lists concat as
    invalid with the reason, and the winner's branches train apart."""
    tiny = [
        {"name": "timm", "model": m, "input_size": 32, "pretrained": False}
        for m in ("test_efficientnet", "test_resnet")
    ]
    (tmp_path / "cands.json").write_text(json.dumps({"backbones": tiny, "fusions": ["concat", "vote"]}))
    run = tmp_path / "run"
    argv = ["train", "--search", "--candidates", str(tmp_path / "cands.json"), "--data", "digits"]
    argv += ["--train-blocks", "1", "--independent-branches", "--out", str(run), "--folds", "2"]
    argv += ["--search-epochs", "2", "--epochs", "2", "--no-cache", "-q", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    invalid = out["search"]["fusions"]["invalid"]
    assert [p["fusion"] for p in invalid] == ["concat", "concat(hidden=512)"]
    assert "cannot train independently" in invalid[0]["error"]
    model = fusion_engine.load(run)
    assert model.config.fusion.name == "vote" and model.history["config"]["independent_branches"]
    assert all("branch_val_accuracy" in e for e in model.history["epochs"])


def test_independent_branches_need_a_head_per_branch(ws, tmp_path, capsys):
    args = train_args(ws, tmp_path / "run") + ["--train-blocks", "1", "--independent-branches", "--fusion", "concat"]
    assert main(args) == 2
    assert "one head over all branches" in capsys.readouterr().err and not (tmp_path / "run").exists()
