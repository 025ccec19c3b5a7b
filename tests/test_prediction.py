"""Prediction on image files: folders and single files, grey and RGB of any size, top-k, the same
answers from the saved model as from the model before saving, ``fusion-engine predict --json`` in a
subprocess, clear errors for paths that are not images, and class names with control characters
printed escaped (text output) but exact (JSON)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits
from PIL import Image

import fusion_engine
from fusion_engine import DataError, Engine
from fusion_engine.cli.main import main
from fusion_engine.core.data import load_dataset
from fusion_engine.errors import printable
from fusion_engine.runtime.prediction import image_files, predict_files

CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32},
        {"name": "timm", "model": "test_efficientnet", "input_size": 32},
    ],
    "fusion": "concat",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained in-process and saved; a folder of images (nested, grey 8x8 PNGs and one RGB JPEG
    of another size, plus files that are skipped) and one single image file outside it."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = Engine.from_plugins().build(CONFIG, class_names=CLASSES)
    model.fit(
        load_dataset(four_digits(160), classes=CLASSES),
        cache_dir=root / "cache",
        epochs=15,
        lr=0.01,
        progress=False,
        log=lambda *a, **k: None,
    )
    model.save(root / "run")
    x, _ = four_digits(9, offset=160)
    images = root / "images"
    (images / "b" / "deeper").mkdir(parents=True)
    (images / "a").mkdir()
    for i, image in enumerate(x[:8]):
        Image.fromarray(image).save(images / ("a" if i < 4 else "b/deeper") / f"{i}.png")
    rgb = np.repeat(np.kron(x[0], np.ones((2, 2), dtype=np.uint8))[:, :, None], 3, axis=2)[:12, :10]
    Image.fromarray(rgb).save(images / "b" / "rgb.jpg", quality=95)
    (images / "notes.txt").write_text("not an image, skipped in a folder")
    (images / ".hidden.png").write_text("hidden, skipped")
    single = root / "single.png"
    Image.fromarray(x[8]).save(single)
    return {"model": model, "run": root / "run", "images": images, "single": single, "root": root}


def flatten(results) -> list[tuple[str, str, float]]:
    return [(r["image"], t["class"], t["probability"]) for r in results for t in r["top"]]


def test_a_folder_is_searched_recursively_and_single_files_are_taken_as_given(trained):
    files = image_files([trained["images"], trained["single"]])
    names = [f.relative_to(trained["root"]).as_posix() for f in files]
    assert names == [
        "images/a/0.png",
        "images/a/1.png",
        "images/a/2.png",
        "images/a/3.png",
        "images/b/deeper/4.png",
        "images/b/deeper/5.png",
        "images/b/deeper/6.png",
        "images/b/deeper/7.png",
        "images/b/rgb.jpg",
        "single.png",
    ]

    results = predict_files(trained["model"], [trained["images"], trained["single"]], top_k=3)
    assert [r["image"] for r in results] == [str(f) for f in files]
    for r in results:
        probabilities = [t["probability"] for t in r["top"]]
        assert len(r["top"]) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert {t["class"] for t in r["top"]} <= set(CLASSES) and 0 < sum(probabilities) <= 1 + 1e-6
    # One file alone gets the same answer as inside a batch of mixed sizes and channels.
    alone = predict_files(trained["model"], [trained["images"] / "b" / "rgb.jpg"], top_k=3)
    assert [t["class"] for t in alone[0]["top"]] == [t["class"] for t in results[8]["top"]]
    assert [t["probability"] for t in alone[0]["top"]] == pytest.approx(
        [t["probability"] for t in results[8]["top"]], abs=1e-5
    )


def test_top_k_is_clipped_to_the_number_of_classes(trained):
    one = predict_files(trained["model"], [trained["single"]], top_k=1)
    every = predict_files(trained["model"], [trained["single"]], top_k=10)
    assert len(one[0]["top"]) == 1 and len(every[0]["top"]) == 4
    assert one[0]["top"][0] == every[0]["top"][0]
    assert sorted(t["class"] for t in every[0]["top"]) == sorted(CLASSES)
    assert sum(t["probability"] for t in every[0]["top"]) == pytest.approx(1, abs=1e-5)


def test_the_saved_model_predicts_exactly_like_the_model_before_saving(trained):
    loaded = fusion_engine.load(trained["run"])
    paths = [trained["images"], trained["single"]]
    assert flatten(predict_files(loaded, paths, top_k=4)) == flatten(predict_files(trained["model"], paths, top_k=4))
    x, _ = four_digits(30, offset=170)
    np.testing.assert_array_equal(loaded.predict_proba(x), trained["model"].predict_proba(x))


def test_cli_predict_json_in_a_subprocess(trained):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_ENGINE_") and k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_engine",
            "predict",
            str(trained["run"]),
            str(trained["images"]),
            str(trained["single"]),
            "--top-k",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=trained["root"],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    expected = predict_files(trained["model"], [trained["images"], trained["single"]], top_k=2)
    assert [r["image"] for r in results] == [r["image"] for r in expected]
    assert all(len(r["top"]) == 2 for r in results)
    got, want = flatten(results), flatten(expected)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-6)


def test_cli_predict_text_output(trained, capsys):
    assert main(["predict", str(trained["run"]), str(trained["single"]), "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert re.fullmatch(r"predicted 1 images in \d+\.\d\d s \(\d+\.\d images/s\)\n", captured.err), captured.err
    assert re.fullmatch(
        re.escape(str(trained["single"])) + r": (zero|one|two|three) [01]\.\d{3}, "
        r"(zero|one|two|three) [01]\.\d{3}",
        line,
    ), line


@pytest.mark.parametrize("what", ["text file", "corrupt image in a folder", "missing path", "folder without images"])
def test_paths_that_are_not_images_are_clean_errors(what, trained, tmp_path, capsys):
    if what == "text file":
        path, match = trained["images"] / "notes.txt", r"cannot read image file .*notes\.txt"
    elif what == "corrupt image in a folder":
        (tmp_path / "x").mkdir()
        Image.fromarray(four_digits(1)[0][0]).save(tmp_path / "x" / "good.png")
        (tmp_path / "x" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
        path, match = tmp_path / "x", r"cannot read image file .*bad\.png"
    elif what == "missing path":
        path, match = tmp_path / "nowhere.png", r"nowhere\.png does not exist"
    else:
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no images")
        path, match = tmp_path / "empty", r"no images found in .*empty"
    with pytest.raises(DataError, match=match):
        predict_files(trained["model"], [path])
    assert main(["predict", str(trained["run"]), str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search("^error: .*" + match, captured.err, re.MULTILINE), captured.err


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain name", "plain name"),
        ("café 猫", "café 猫"),  # printable non-ASCII stays as it is
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("two\nlines\ttab\r", "two\\nlines\\ttab\\r"),
        ("\u202eevil", "\\u202eevil"),  # bidi override
        ("bad\udcffbyte", "bad\\udcffbyte"),  # a surrogate-escaped file name byte
        ("\x07bell\x7f", "\\x07bell\\x7f"),
    ],
)
def test_printable_escapes_control_characters_only(text, shown):
    assert printable(text) == shown
    assert printable(text).isprintable()


ESCAPED_CLASSES = ["\x1b[31mzero", "one\x1b[0m", "two\nlines", "three"]


@pytest.fixture(scope="module")
def escaped_run(trained):
    """The trained model saved again with class names that carry ANSI escapes and a newline."""
    model = fusion_engine.load(trained["run"])
    model.class_names = list(ESCAPED_CLASSES)
    model.save(trained["root"] / "escaped-run")
    return trained["root"] / "escaped-run"


def test_predict_prints_class_names_escaped_and_json_exact(escaped_run, trained, capsys):
    assert main(["predict", str(escaped_run), str(trained["images"]), "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.splitlines()) == 9  # one line per image: no raw newline either
    for name in ("\\x1b[31mzero", "one\\x1b[0m", "two\\nlines", "three"):
        assert out.count(name + " ") == 9, out
    assert main(["predict", str(escaped_run), str(trained["single"]), "--top-k", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert sorted(t["class"] for t in results[0]["top"]) == sorted(ESCAPED_CLASSES)


def test_evaluate_prints_class_names_escaped(escaped_run, tmp_path, capsys):
    x, y = four_digits(40, offset=160)
    data = tmp_path / "held_out.npz"
    np.savez(data, x=x, y=y, classes=np.asarray(ESCAPED_CLASSES))
    png = tmp_path / "confusion.png"
    assert (
        main(["evaluate", str(escaped_run), "--data", str(data), "--no-cache", "-q", "--confusion-png", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out
    per_class = next(line for line in out.splitlines() if line.startswith("per-class accuracy: "))
    assert re.fullmatch(
        r"per-class accuracy: \\x1b\[31mzero=\d\.\d{3}, one\\x1b\[0m=\d\.\d{3}, two\\nlines=\d\.\d{3}, three=\d\.\d{3}",
        per_class,
    ), per_class
    assert main(["evaluate", str(escaped_run), "--data", str(data), "--no-cache", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["per_class"]) == ESCAPED_CLASSES
