"""The evaluation report as one self-contained HTML page: the side-by-side table (fused model, each branch's
probe, the handcrafted baseline) with the fused model's margins, an accuracy chart with 95% intervals, the
confusion matrix with counts, per-class accuracy, the search leaderboard when there was one, the most
confident mistakes as thumbnails, and the model's provenance.

Images are PNGs embedded as ``data:`` URIs; no script, no external file, nothing fetched. Every text that
comes from data, a manifest or a plugin (class names, file names, options) is escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path

from fusion_engine.artifacts.atomic import atomic_write_text
from fusion_engine.errors import DataError, printable
from fusion_engine.training.metrics import margin_text, wilson_interval
from fusion_engine.training.provenance import provenance
from fusion_engine.training.report_images import accuracy_chart, confusion_matrix_chart, thumbnail
from fusion_engine.version import __version__

MISTAKES = 16  # thumbnails in the grid of the most confident mistakes

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1b1f24;
       margin: 0 auto; max-width: 1120px; padding: 24px 32px 48px; line-height: 1.45; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin: 36px 0 10px;
     border-bottom: 1px solid #d5dae0; padding-bottom: 4px; } h3 { font-size: 1.05em; margin: 18px 0 6px; }
.sub { color: #57606a; margin: 0 0 8px; } .note { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 0.92em; }
th, td { border: 1px solid #d5dae0; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fused td { font-weight: 600; background: #eef5fc; } tr.winner td { background: #eef9ee; }
.good { color: #1a7f37; } .bad { color: #c62828; }
.hash { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.85em; word-break: break-all; }
.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.bar { background: #e4e9ee; width: 120px; height: 10px; display: inline-block; vertical-align: middle; }
.bar span { background: #1f6fb4; height: 10px; display: block; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #d5dae0; border-radius: 6px; padding: 8px; background: #fafbfc; }
figure img { width: 112px; height: 112px; object-fit: contain; image-rendering: pixelated; display: block;
             margin: 0 auto 6px; background: #fff; }
figcaption { font-size: 0.82em; overflow-wrap: anywhere; }
"""


def text(value) -> str:
    """``value`` as HTML text: control characters escaped (``printable``), then HTML-escaped."""
    return html.escape(printable(value))


def report_path(run_dir) -> Path:
    """Where the report of ``run_dir`` goes by default: beside it, ``RUN_DIR.report.html``."""
    return Path(str(Path(run_dir)) + ".report.html")


def write_report(
    report, path, *, model, run_dir=None, verified: bool = False, mistakes: int = MISTAKES, title: str | None = None
) -> Path:
    """Write ``report`` (an :class:`~fusion_engine.training.evaluation.EvaluationReport` of ``model``) as a
    self-contained HTML page at ``path`` (atomically) and return the path.

    ``run_dir``: the RUN_DIR the model was loaded from or saved to (its manifest and signature go into the
    provenance); ``verified``: its signature was verified with a public key; ``mistakes``: how many of the most
    confident mistakes to show."""
    path = Path(path)
    atomic_write_text(path, render(report, model=model, run_dir=run_dir, verified=verified, mistakes=mistakes,
                                   title=title))  # fmt: skip
    return path


def write_report_beside(report, run_dir, *, model, log=print, verified: bool = False) -> Path | None:
    """After ``train`` or ``evaluate`` has saved or read ``run_dir``: write ``RUN_DIR.report.html`` and log its
    path. A report that cannot be written is logged as a warning; the run it describes is done and stays so."""
    path = report_path(run_dir)
    try:
        write_report(report, path, model=model, run_dir=run_dir, verified=verified)
    except OSError as e:
        log(f"warning: could not write the report {path}: {e}")
        return None
    log(f"report: {path}")
    return path


# --- the page --------------------------------------------------------------------------------------------


def render(report, *, model, run_dir=None, verified: bool = False, mistakes: int = MISTAKES, title=None) -> str:
    """The report page as an HTML string."""
    dataset = getattr(report, "dataset", None)
    name = title or (f"{Path(run_dir).name}" if run_dir is not None else "fused model")
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = f"{text(dataset.name)}: " if dataset is not None else ""
    sections = [
        f"<h1>Evaluation report: {text(name)}</h1>",
        f'<p class="sub">{data}{report["n"]} held-out images, {len(report["per_class"])} classes; '
        f"written {when} by fusion-engine {text(__version__)}</p>",
        _summary(report),
        "<h2>Confusion matrix</h2>",
        _chart(
            confusion_matrix_chart,
            report["confusion_matrix"],
            list(report["per_class"]),
            alt="confusion matrix of the fused model with counts",
        ),  # fmt: skip
        '<p class="note">Rows: true class; columns: predicted class. Correct answers (the diagonal) in blue,'
        " errors in red, each on its own scale; empty cells are zero.</p>",
        _per_class(report),
        _mistakes(report, mistakes),
        _leaderboard(getattr(model, "history", None) or {}),
        _provenance(provenance(model, run_dir, verified=verified)),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>fusion-engine report: {text(name)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _img(png: bytes, alt: str, css: str = "chart") -> str:
    return f'<img class="{css}" alt="{text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _chart(draw, *args, alt: str) -> str:
    try:
        return _img(draw(*args), alt)
    except ImportError:
        return f'<p class="note">({text(alt)}: drawing charts needs matplotlib; pip install "matplotlib>=3.6")</p>'


def _rows(report) -> list[tuple[str, dict, str]]:
    """(label, metrics, css class): the fused model, each branch's probe, each baseline."""
    rows = [("fused model", report, "fused")]
    rows += [(f"branch {name} (probe)", m, "") for name, m in (report.get("branch_metrics") or {}).items()]
    rows += [(f"baseline {name}", m, "") for name, m in (report.get("baseline_metrics") or {}).items()]
    return rows


def _points(difference: float) -> str:
    css = "good" if difference > 0 else "bad" if difference < 0 else ""
    return f'<span class="{css}">{100 * difference:+.1f}</span>'


def _summary(report) -> str:
    n = report["n"]
    rows = _rows(report)
    out = [
        "<h2>Fused model, each branch, handcrafted baseline</h2>",
        "<table><tr><th>model</th><th>accuracy</th><th>95% interval</th><th>macro-F1</th>"
        "<th>fused margin, accuracy (points)</th><th>fused margin, macro-F1 (points)</th></tr>",
    ]
    for label, m, css in rows:
        low, high = wilson_interval(round(m["accuracy"] * n), n)
        margins = (
            "<td class='num'>&mdash;</td><td class='num'>&mdash;</td>"
            if css == "fused"
            else f"<td class='num'>{_points(report['accuracy'] - m['accuracy'])}</td>"
            f"<td class='num'>{_points(report['macro_f1'] - m['macro_f1'])}</td>"
        )
        out.append(
            f'<tr class="{css}"><td>{text(label)}</td><td class="num">{m["accuracy"]:.4f}</td>'
            f'<td class="num">[{low:.3f}, {high:.3f}]</td><td class="num">{m["macro_f1"]:.4f}</td>{margins}</tr>'
        )
    out.append("</table>")
    margins, se = report.get("margins"), report.get("margin_se", {})
    if margins:
        best = "beats" if margins["vs_best_branch"] > 0 else "does not beat"
        hand = "beats" if margins["vs_handcrafted"] > 0 else "does not beat"
        out.append(
            f"<p>The fused model {best} its best branch, {margin_text(margins['vs_best_branch'], se.get('vs_best_branch'))}, "
            f"and {hand} the handcrafted baseline, {margin_text(margins['vs_handcrafted'], se.get('vs_handcrafted'))}, "
            f"on these {n} images.</p>"
        )
    else:
        out.append(
            '<p class="note">This model carries no baselines (trained with baselines off): fused model only.</p>'
        )
    out.append(
        '<p class="note">Intervals: Wilson score 95% interval of each accuracy on these images; margins: the fused '
        "model minus that row, in percentage points; 2 s.e.: two standard errors of the margin, paired on these "
        "images (a margin larger than that is beyond the noise).</p>"
    )
    out.append(_chart(accuracy_chart, [(label, round(m["accuracy"] * n), n) for label, m, _ in rows],
                      alt="accuracy of each model with 95% intervals"))  # fmt: skip
    return "\n".join(out)


def _per_class(report) -> str:
    names = list(report["per_class"])
    matrix = report["confusion_matrix"]
    branches = report.get("branch_metrics") or {}
    head = "".join(f"<th>branch {text(b)}</th>" for b in branches)
    out = [
        "<h2>Per-class accuracy</h2>",
        f"<table><tr><th>class</th><th>images</th><th>correct</th><th>fused accuracy</th><th></th>{head}"
        "<th>most often predicted instead</th></tr>",
    ]
    for i, name in enumerate(names):
        row = matrix[i]
        support, correct = sum(row), row[i]
        accuracy = report["per_class"][name]
        others = [(count, j) for j, count in enumerate(row) if j != i and count]
        confused = f"{text(names[max(others)[1]])} ({max(others)[0]})" if others else "&mdash;"
        shown = f"{accuracy:.3f}" if accuracy is not None else "n/a"
        bar = f'<span class="bar"><span style="width:{100 * (accuracy or 0):.0f}%"></span></span>'
        cells = "".join(f'<td class="num">{_fraction(m["per_class"].get(name))}</td>' for m in branches.values())
        out.append(
            f'<tr><td>{text(name)}</td><td class="num">{support}</td><td class="num">{correct}</td>'
            f'<td class="num">{shown}</td><td>{bar}</td>{cells}<td>{confused}</td></tr>'
        )
    out.append("</table>")
    return "\n".join(out)


def _fraction(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _image_name(dataset, index: int) -> str:
    paths = getattr(dataset, "paths", None)
    return str(paths[index]) if paths is not None else f"image #{index}"


def _mistakes(report, limit: int) -> str:
    if not hasattr(report, "mistakes") or limit <= 0:
        return ""
    wrong = report.mistakes(limit)
    out = [f"<h2>The {len(wrong)} most confident mistakes</h2>" if wrong else "<h2>Mistakes</h2>"]
    if not wrong:
        out.append(f"<p>The fused model gets all {report['n']} images right.</p>")
        return "\n".join(out)
    dataset = report.dataset
    cards = []
    for m in wrong:
        try:
            picture = _img(thumbnail(dataset[m["index"]][0]), f"true {m['true']}, predicted {m['predicted']}", "")
        except (DataError, OSError, TypeError, IndexError, ValueError):
            picture = '<p class="note">(image unavailable)</p>'
        cards.append(
            f"<figure>{picture}<figcaption>true: <b>{text(m['true'])}</b><br>predicted: "
            f"<b class='bad'>{text(m['predicted'])}</b> ({m['probability']:.2f})<br>"
            f"<span class='note'>p(true) {m['true_probability']:.2f}; {text(_image_name(dataset, m['index']))}"
            "</span></figcaption></figure>"
        )
    out.append('<div class="grid">' + "".join(cards) + "</div>")
    out.append(
        '<p class="note">Wrong answers of the fused model, highest predicted probability first; p(true): the '
        "probability it gave the true class.</p>"
    )
    return "\n".join(out)


def _number(value, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "&mdash;"
    return format(value, spec)


def _leaderboard(history: dict) -> str:
    search = history.get("search") if isinstance(history, dict) else None
    board = search.get("leaderboard") if isinstance(search, dict) else None
    if not isinstance(board, list) or not board:
        return ""
    out = [
        "<h2>Search leaderboard</h2>",
        "<table><tr><th>rank</th><th>candidate</th><th>kind</th><th>CV accuracy (mean &plusmn; sd)</th>"
        "<th>held-out</th><th>feature width</th><th>images/s</th><th>parameters</th></tr>",
    ]
    for row in board:
        if not isinstance(row, dict):
            continue
        if isinstance(row.get("cv_mean"), (int, float)):
            cv = f"{_number(row.get('cv_mean'), '.4f')} &plusmn; {_number(row.get('cv_std'), '.4f')}"
            if row.get("stopped_early"):
                cv += f" <span title='{text(str(row['stopped_early']))}'>(stopped early)</span>"
        else:
            cv = f"failed: {text(str(row.get('error', 'not scored'))[:120])}"
        winner = row.get("winner") is True
        out.append(
            f'<tr class="{"winner" if winner else ""}"><td class="num">{_number(row.get("rank"), "d")}</td>'
            f"<td>{text(row.get('candidate', '?'))}{' <b>(winner)</b>' if winner else ''}</td>"
            f"<td>{text(row.get('kind', ''))}</td><td class='num'>{cv}</td>"
            f"<td class='num'>{_number(row.get('held_out'), '.4f')}</td>"
            f"<td class='num'>{_number(row.get('feature_width'), 'd')}</td>"
            f"<td class='num'>{_number(row.get('images_per_second'), '.0f')}</td>"
            f"<td class='num'>{_number(row.get('parameters'), ',d')}</td></tr>"
        )
    out.append("</table>")
    notes = [search.get("stopped"), (search.get("ranking") or {}).get("statement")]
    out += [f'<p class="note">{text(note)}</p>' for note in notes if isinstance(note, str) and note]
    return "\n".join(out)


def _value(value) -> str:
    return text(value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True))


def _provenance(p: dict) -> str:
    out = ["<h2>Provenance</h2>", "<h3>Backbones</h3>"]
    out.append(
        "<table><tr><th>branch</th><th>backbone and options</th><th>extractor</th><th>features</th>"
        "<th>input</th><th>weights sha256 (branch tensors)</th></tr>"
    )
    for b in p["backbones"]:
        options = ", ".join(f"{text(k)}={_value(v)}" for k, v in b["options"].items())
        extractor = b["extractor"] + (f" {json.dumps(b['extractor_options'])}" if b["extractor_options"] else "")
        size = "&times;".join(str(s) for s in b["input_size"][-2:]) if b["input_size"] else "?"
        out.append(
            f"<tr><td>{text(b['name'])}{'' if b['frozen'] else ' (fine-tuned)'}</td><td>{text(b['backbone'])}"
            f"<br><span class='note'>{options}</span></td><td>{text(extractor)}</td>"
            f"<td class='num'>{b['feature_dim']}</td><td class='num'>{size}</td>"
            f"<td class='hash'>{text(b['weights_sha256'])}</td></tr>"
        )
    out.append("</table>")
    fusion = p["fusion"]
    out.append(f"<p>Fusion: <b>{text(fusion['name'])}</b> <span class='note'>{_value(fusion['options'])}</span></p>")
    out.append("<h3>Plugins</h3><table><tr><th>kind</th><th>component</th><th>plugin</th><th>version</th>"
               "<th>distribution</th></tr>")  # fmt: skip
    for c in p["components"]:
        out.append(
            "<tr>"
            + "".join(f"<td>{text(c.get(k) or '')}</td>" for k in ("kind", "name", "plugin", "version", "distribution"))
            + "</tr>"
        )
    out.append("</table>")
    sig = p["signature"]
    out.append("<h3>Files and signature</h3>")
    if p["files"]:
        out.append("<table><tr><th>file</th><th>sha256</th></tr>")
        out += [f"<tr><td>{text(f)}</td><td class='hash'>{text(d)}</td></tr>" for f, d in p["files"].items()]
        out.append("</table>")
    fingerprint = (
        f" (key fingerprint <span class='hash'>{text(sig['fingerprint'])}</span>)" if sig["fingerprint"] else ""
    )
    css = "good" if sig["verified"] else "" if sig["signed"] else "bad"
    out.append(f"<p>Signature: <span class='{css}'>{text(sig['status'])}</span>{fingerprint}</p>")
    extra = []
    if p["encrypted"]:
        extra.append("tensors stored encrypted (AES-256-GCM)")
    if p["compression"]:
        extra.append("compressed: " + ", ".join(p["compression"]))
    if p["created"]:
        extra.append(f"saved {p['created']}")
    if extra:
        out.append(f"<p>{text('; '.join(extra))}</p>")
    out.append("<h3>Versions</h3><table><tr><th>package</th><th>saved with</th><th>evaluated with</th></tr>")
    for package in sorted(set(p["run_with"]) | set(p["saved_with"])):
        saved = p["saved_with"].get(package, "\u2014")
        out.append(
            f"<tr><td>{text(package)}</td><td>{text(saved)}</td><td>{text(p['run_with'].get(package, ''))}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)
