"""The evaluation report: ``evaluate()``'s report object (a dict of the metrics that prints as the table and
keeps the fused model's probabilities), and the self-contained HTML page that ``train`` and ``evaluate``
write beside RUN_DIR: the table values, the class names escaped, the charts and mistake thumbnails as
``data:`` URIs, the search leaderboard, the provenance; rendered in headless Chromium when it is installed.

One signed model (two tiny timm backbones, with baselines) is trained through ``fusion-engine train`` on
4-class digits whose class names carry HTML, quotes, ``$`` and a control character."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import timm
import torch
from four_digits import four_digits
from PIL import Image

import fusion_engine
import fusion_engine.training.report as report_module
from fusion_engine.artifacts.signing import generate_keypair
from fusion_engine.cli.main import main
from fusion_engine.training.evaluation import EvaluationReport
from fusion_engine.training.feature_cache import FeatureCache, tensors_digest
from fusion_engine.training.metrics import (
    classification_metrics,
    format_report,
    paired_difference_se,
    wilson_interval,
)
from fusion_engine.training.report import MISTAKES, render, report_path, write_report

CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32},
        {"name": "timm", "model": "test_efficientnet", "input_size": 32},
    ],
    "fusion": "concat",
}
CLASSES = ["<b>zero</b>", "one & only", 'two "quoted"', "th\x1bree $x$"]
ESCAPED = ["&lt;b&gt;zero&lt;/b&gt;", "one &amp; only", "two &quot;quoted&quot;", "th\\x1bree $x$"]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """``fusion-engine train`` (signed) on 160 images, then the model loaded with its public key, evaluated
    on 80 held-out images, and its report page written."""
    root = tmp_path_factory.mktemp("report")
    for name, (start, stop) in {"train": (0, 160), "test": (160, 240)}.items():
        x, y = four_digits(stop - start, start)
        np.savez(root / f"{name}.npz", x=x, y=y, classes=np.asarray(CLASSES))
    (root / "config.json").write_text(json.dumps(CONFIG))
    private, public = generate_keypair(root / "key")
    run, cache = root / "run", root / "cache"
    args = ["train", "--config", root / "config.json", "--data", root / "train.npz", "--data-test", root / "test.npz"]
    args += ["--out", run, "--epochs", "20", "--cache-dir", cache, "--sign-key", private, "-q"]
    assert main([str(a) for a in args]) == 0
    train_html = report_path(run).read_text()  # kept: the evaluate tests below rewrite that file
    model = fusion_engine.load(run, public_key=public)
    report = model.evaluate(root / "test.npz", cache=FeatureCache(cache), progress=False)
    page = write_report(report, root / "page.html", model=model, run_dir=run, verified=True)
    return {"root": root, "run": run, "cache": cache, "public": public, "model": model, "report": report,
            "page": page, "html": page.read_text(), "train_html": train_html}  # fmt: skip


def rows(report) -> dict:
    """label -> metrics, as the table shows them."""
    out = {"fused model": report}
    out.update({f"branch {k} (probe)": m for k, m in report["branch_metrics"].items()})
    out.update({f"baseline {k}": m for k, m in report["baseline_metrics"].items()})
    return out


# --- the report object -------------------------------------------------------------------------------------


def test_evaluate_returns_a_report_that_prints_the_table_and_converts_to_dict_and_json(ws):
    report = ws["report"]
    assert isinstance(report, EvaluationReport)
    assert str(report) == format_report(report.to_dict())
    assert str(report).splitlines()[0].startswith("model") and "fused vs best branch" in str(report)
    assert repr(report).startswith(f"EvaluationReport(accuracy={report['accuracy']:.4f}")
    plain = report.to_dict()
    assert type(plain) is dict and json.loads(report.to_json()) == json.loads(json.dumps(plain))
    assert set(plain) == {"accuracy", "macro_f1", "n", "per_class", "confusion_matrix", "branch_metrics",
                          "baseline_metrics", "branches", "baselines", "margins", "margin_se"}  # fmt: skip
    # dict access as before; the probabilities stay out of the dict (and out of the saved manifest)
    assert report.get("margins") == plain["margins"] and report["n"] == 80 and "probabilities" not in report
    assert report.probabilities.shape == (80, 4) and np.allclose(report.probabilities.sum(1), 1, atol=1e-5)
    matrix = np.array(report["confusion_matrix"])
    assert np.trace(matrix) == round(report["accuracy"] * 80) == int((report.predictions == report.targets).sum())
    saved = json.loads((ws["run"] / "manifest.json").read_text())["metrics"]["test"]
    assert saved["accuracy"] == pytest.approx(report["accuracy"]) and "probabilities" not in saved


def test_mistakes_are_the_wrong_answers_most_confident_first(ws):
    report = ws["report"]
    wrong = report.mistakes()
    assert len(wrong) == 80 - np.trace(np.array(report["confusion_matrix"])) > 0
    assert [m["probability"] for m in wrong] == sorted((m["probability"] for m in wrong), reverse=True)
    for m in wrong:
        assert m["true"] != m["predicted"] and m["true"] == CLASSES[report.targets[m["index"]]]
        assert m["probability"] == pytest.approx(report.probabilities[m["index"]].max())
    assert report.mistakes(3) == wrong[:3]


def test_paired_difference_se_counts_only_the_images_the_two_disagree_on():
    y = np.zeros(100, dtype=int)
    a, b = y.copy(), y.copy()
    a[:4] = 1  # a wrong on images 0-3
    b[[0, 1, 2, 9]] = 1  # b wrong on 0-2 as well and on 9: they disagree on 3 and 9 only
    d = np.r_[-1, 1, np.zeros(98)]
    assert paired_difference_se(y, a, b) == pytest.approx(d.std(ddof=1) / 10)
    assert paired_difference_se(y, a, a) == 0.0  # the same answers: no noise in the difference
    independent = np.sqrt(2 * 0.96 * 0.04 / 100)  # both 96% right, as if on different images
    assert paired_difference_se(y, a, b) < 0.6 * independent


def test_margins_carry_their_paired_standard_errors(ws):
    report = ws["report"]
    best = max(report["branches"], key=report["branches"].get)
    assert report["margin_se"]["vs_best_branch"] > 0 and report["margin_se"]["vs_handcrafted"] > 0
    se = report["margin_se"]["vs_handcrafted"]
    assert f"vs handcrafted: {100 * report['margins']['vs_handcrafted']:+.2f} points (2 s.e. {200 * se:.2f})" in str(
        report
    )
    assert best in report["branches"] and f"(2 s.e. {200 * report['margin_se']['vs_best_branch']:.2f})" in ws["html"]


def test_wilson_interval():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not empty at 0%
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# --- the page ----------------------------------------------------------------------------------------------


def test_page_is_self_contained(ws):
    html = ws["html"]
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for outside in ("http://", "https://", "<script", "<link", "url(", "<iframe"):
        assert outside not in html, outside
    for png in DATA_URI.findall(html):
        assert Image.open(io.BytesIO(base64.b64decode(png))).format == "PNG"


def test_page_holds_the_table_values_and_margins(ws):
    html, report = ws["html"], ws["report"]
    for label, m in rows(report).items():
        row = re.search(rf"<tr[^>]*><td>{re.escape(label)}</td>(.*?)</tr>", html)
        assert row, label
        low, high = wilson_interval(round(m["accuracy"] * 80), 80)
        for value in (f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"[{low:.3f}, {high:.3f}]"):
            assert value in row.group(1), (label, value)
        if label != "fused model":
            assert f"{100 * (report['accuracy'] - m['accuracy']):+.1f}<" in row.group(1), label
    assert len(re.findall(r'alt="accuracy of each model with 95% intervals"', html)) == 1
    assert "Wilson score 95% interval" in html and "Confusion matrix" in html
    beats = "beats" if report["margins"]["vs_best_branch"] > 0 else "does not beat"
    assert f"The fused model {beats} its best branch" in html


def test_page_escapes_class_names(ws):
    html = ws["html"]
    for raw, escaped in zip(CLASSES, ESCAPED):
        assert f"<td>{escaped}</td>" in html  # the per-class table
        if raw != escaped:
            assert raw not in html
    assert "\x1b" not in html


def test_page_shows_the_most_confident_mistakes_as_thumbnails(ws):
    html, report = ws["html"], ws["report"]
    wrong = report.mistakes(MISTAKES)
    figures = re.findall(r"<figure>(.*?)</figure>", html)
    assert len(figures) == len(wrong) > 0
    for figure, m in zip(figures, wrong):
        (png,) = DATA_URI.findall(figure)
        thumb = Image.open(io.BytesIO(base64.b64decode(png)))
        assert max(thumb.size) == 112  # 8x8 digits enlarged
        true, predicted = (ESCAPED[CLASSES.index(m[k])] for k in ("true", "predicted"))
        assert f"true: <b>{true}</b>" in figure and f"{predicted}</b> ({m['probability']:.2f})" in figure
        assert f"image #{m['index']}" in figure


def test_page_shows_the_provenance(ws):
    html, model = ws["html"], ws["model"]
    manifest = model.manifest
    assert manifest.files["model.safetensors"] in html
    for branch in model.branches:
        assert branch.name in html and tensors_digest(branch) in html
    for c in manifest.components:
        assert f"<td>{c.plugin}</td>" in html
    signature = json.loads((ws["run"] / "manifest.sig").read_text())
    assert "signed; signature verified with the given public key" in html
    assert signature["public_key_fingerprint"] in html
    for version in (torch.__version__, timm.__version__, fusion_engine.__version__):
        assert f"<td>{version}</td>" in html


def test_train_wrote_the_report_beside_run_dir(ws):
    assert report_path(ws["run"]) == ws["root"] / "run.report.html"
    html = ws["train_html"]
    assert f"{ws['report']['accuracy']:.4f}" in html  # train evaluated the same model on the same images
    assert "signed; signature not checked here" in html and len(DATA_URI.findall(html)) >= 3


def test_page_shows_the_search_leaderboard_escaped(ws, monkeypatch):
    assert "Search leaderboard" not in ws["html"]
    board = [
        {"rank": 1, "candidate": "<i>fused</i>", "kind": "fused", "cv_mean": 0.9, "cv_std": 0.01, "held_out": 0.85,
         "feature_width": 352, "images_per_second": 1234.5, "parameters": 473336, "winner": True},
        {"rank": None, "candidate": "broken", "kind": "single", "cv_mean": None, "error": "<oops>", "winner": False},
        "not a row",
    ]  # fmt: skip
    monkeypatch.setattr(ws["model"], "history", {"search": {"leaderboard": board, "stopped": "budget & time"}})
    html = render(ws["report"], model=ws["model"], run_dir=ws["run"])
    assert "Search leaderboard" in html
    assert re.search(r'<tr class="winner"><td class="num">1</td><td>&lt;i&gt;fused&lt;/i&gt; <b>\(winner\)</b>', html)
    for cell in ("0.9000 &plusmn; 0.0100", "0.8500", "1234", "473,336", "failed: &lt;oops&gt;", "budget &amp; time"):
        assert cell in html, cell


def test_page_of_a_model_without_baselines_and_without_matplotlib(ws, monkeypatch):
    report = ws["report"]
    metrics = classification_metrics(report.targets, report.predictions, CLASSES)
    alone = EvaluationReport(metrics, class_names=CLASSES, targets=report.targets,
                             probabilities=report.probabilities, dataset=report.dataset)  # fmt: skip

    def no_matplotlib(*args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report_module, "accuracy_chart", no_matplotlib)
    monkeypatch.setattr(report_module, "confusion_matrix_chart", no_matplotlib)
    html = render(alone, model=ws["model"], run_dir=ws["run"])
    assert "carries no baselines" in html and "branch timm:test_resnet (probe)" not in html
    assert html.count("drawing charts needs matplotlib") == 2
    assert f"{metrics['accuracy']:.4f}" in html and len(re.findall(r"<figure>", html)) == len(alone.mistakes(16))


# --- the command line ----------------------------------------------------------------------------------------


def evaluate_args(ws, *extra) -> list[str]:
    return ["evaluate", str(ws["run"]), "--data", str(ws["root"] / "test.npz"), "--cache-dir", str(ws["cache"]),
            "-q", *map(str, extra)]  # fmt: skip


def test_evaluate_writes_the_report_beside_run_dir_or_where_asked(ws, capsys, tmp_path):
    beside = report_path(ws["run"])
    beside.unlink()
    assert main(evaluate_args(ws, "--no-report")) == 0
    assert not beside.exists() and "report:" not in capsys.readouterr().out

    assert main(evaluate_args(ws, "--public-key", ws["public"])) == 0
    out = capsys.readouterr().out
    assert str(ws["report"]) in out and f"report: {beside}" in out
    assert "signature verified with the given public key" in beside.read_text()

    chosen, png = tmp_path / "sub" / "mine.html", tmp_path / "confusion.png"
    assert main(evaluate_args(ws, "--report", chosen, "--confusion-png", png, "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_html"] == str(chosen) and printed["confusion_png"] == str(png)
    assert printed["accuracy"] == ws["report"]["accuracy"]
    assert "signed; signature not checked here" in chosen.read_text()  # no --public-key this time
    assert Image.open(png).format == "PNG"


def test_evaluate_report_path_that_cannot_be_written_is_a_clean_error(ws, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert main(evaluate_args(ws, "--report", tmp_path / "a-file" / "report.html")) == 2
    assert re.search(
        r"^error: cannot write .*report\.html: .*--report PATH \(or --no-report\)", capsys.readouterr().err
    )
    assert main(evaluate_args(ws, "--report", tmp_path / "r.html", "--no-report")) == 2
    assert "contradict" in capsys.readouterr().err


# --- in a browser --------------------------------------------------------------------------------------------


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(
    chromium() is None, reason="no Chromium on PATH (apt-get install chromium): the page is not rendered"
)
def test_page_renders_in_headless_chromium(ws, tmp_path):
    shot = tmp_path / "report.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               f"--screenshot={shot}", "--window-size=1200,3000", ws["page"].resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (3000, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, tables and pictures, not a blank page
    # the confusion matrix's darkest blue (matplotlib's Blues at its maximum, the largest diagonal count) is
    # drawn only inside the embedded chart: the images were decoded and shown
    dark_blue = (np.abs(pixels.astype(int) - (8, 48, 107)).sum(axis=2) < 12).sum()
    assert dark_blue > 1000, dark_blue
    # the thumbnails: large black areas of the enlarged digits, inside the page below the charts
    assert (pixels[1500:].sum(axis=2) == 0).sum() > 5000
