"""The HTML report's images as PNG bytes: the accuracy chart with 95% intervals, the confusion matrix with
counts, and image thumbnails.

Charts are drawn with matplotlib's object API on its Agg canvas (``matplotlib.figure.Figure``), never
through pyplot: no backend is switched and no global figure state is touched in the caller's process.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from fusion_engine.errors import printable
from fusion_engine.training.metrics import wilson_interval

FUSED_COLOUR = "#1f6fb4"
OTHER_COLOUR = "#9aa7b4"


def chart_label(text, limit: int = 32) -> str:
    """``text`` for a matplotlib label: control characters escaped, ``$`` kept literal (no mathtext), and
    shortened to ``limit`` characters."""
    text = printable(text)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text.replace("$", r"\$")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def accuracy_chart(rows: list[tuple[str, int, int]]) -> bytes:
    """Horizontal bars of accuracy with Wilson 95% intervals; ``rows``: (label, correct, n), fused model first."""
    from matplotlib.figure import Figure

    labels = [chart_label(label, 40) for label, _, _ in rows]
    accuracies = np.array([correct / n if n else 0.0 for _, correct, n in rows])
    intervals = np.array([wilson_interval(correct, n) for _, correct, n in rows]).reshape(-1, 2)
    errors = np.abs(np.stack([accuracies - intervals[:, 0], intervals[:, 1] - accuracies]))
    fig = Figure(figsize=(8.5, 1.2 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    colours = [FUSED_COLOUR] + [OTHER_COLOUR] * (len(rows) - 1)
    ax.barh(y, accuracies, xerr=errors, color=colours, capsize=4, error_kw={"elinewidth": 1.2, "ecolor": "#333"})
    for yi, acc, (low, high) in zip(y, accuracies, intervals):
        ax.text(min(high + 0.01, 1.01), yi, f"{acc:.3f}  [{low:.3f}, {high:.3f}]", va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # the fused model on top
    ax.set_xlim(0, 1.32)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("held-out accuracy (bars: Wilson 95% interval)")
    ax.set_title(f"Accuracy on {rows[0][2] if rows else 0} held-out images")
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def confusion_matrix_chart(matrix, class_names, title: str = "Confusion matrix of the fused model") -> bytes:
    """The confusion matrix with a count in every non-empty cell: correct answers (the diagonal) in blue and
    errors (off the diagonal) in red, each on its own colour scale so that a few errors stay visible next
    to many correct answers; one colour bar per scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    matrix = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    diagonal = np.eye(k, dtype=bool)
    side = float(min(max(4.5, 2.8 + 0.45 * k), 22.0))
    fig = Figure(figsize=(side + 2.2, side), layout="constrained")
    ax = fig.subplots()
    correct = np.ma.masked_where(~diagonal | (matrix == 0), matrix)
    errors = np.ma.masked_where(diagonal | (matrix == 0), matrix)
    blue = ax.imshow(correct, cmap="Blues", vmin=0, vmax=max(1, int(matrix[diagonal].max(initial=0))))
    red = ax.imshow(errors, cmap="Reds", vmin=0, vmax=max(1, int(matrix[~diagonal].max(initial=0))))
    ax.set_facecolor("#f7f7f7")
    if k <= 40:
        size = 10 if k <= 12 else 8 if k <= 24 else 6
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    scale = blue if i == j else red
                    dark = scale.norm(matrix[i, j]) > 0.55
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if dark else "black")  # fmt: skip
    names = [chart_label(c, 24) for c in class_names]
    tick_size = 10 if k <= 12 else 8 if k <= 30 else 6
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=tick_size)
    ax.set_yticks(range(k), names, fontsize=tick_size)
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title} (counts, n={int(matrix.sum())})")
    for scale, label in ((blue, "correct (diagonal)"), (red, "errors (off the diagonal)")):
        bar = fig.colorbar(scale, ax=ax, shrink=0.8, pad=0.01, label=label)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.25 steps
    return _png(fig)


def thumbnail(image: torch.Tensor, size: int = 112) -> bytes:
    """A uint8 (C, H, W) image as a PNG whose longer side is ``size``: small images are enlarged without
    smoothing (pixels stay sharp), large ones reduced with a Lanczos filter."""
    array = image.detach().cpu()
    if array.dtype != torch.uint8:
        array = (array.float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = array.numpy()
    picture = Image.fromarray(array[0] if array.shape[0] < 3 else np.moveaxis(array[:3], 0, -1))
    scale = size / max(picture.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
