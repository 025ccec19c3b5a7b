"""Classification metrics, their 95% intervals and their plain-text table."""

from __future__ import annotations

import numpy as np

from fusion_engine.errors import printable


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """Accuracy, macro-F1, per-class accuracy and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    support = matrix.sum(axis=1)
    per_class = {name: (float(matrix[i, i] / support[i]) if support[i] else None) for i, name in enumerate(class_names)}
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` (95% with ``z=1.96``).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_difference_se(y_true, pred_a, pred_b) -> float:
    """The standard error of accuracy(a) - accuracy(b) on the same images: the spread of the per-image
    difference of being right (1, 0 or -1), so only the images the two disagree on count (as in McNemar's
    test). Smaller than treating the accuracies as independent, which ignores that both get most images right."""
    y_true = np.asarray(y_true)
    n = len(y_true)
    if n < 2:
        return float("nan")
    difference = (np.asarray(pred_a) == y_true).astype(float) - (np.asarray(pred_b) == y_true).astype(float)
    return float(difference.std(ddof=1) / np.sqrt(n))


def margin_text(margin: float, se: float | None) -> str:
    """'+0.65 points (2 s.e. 0.52)': a margin in points with two standard errors when known."""
    return f"{100 * margin:+.2f} points" + (f" (2 s.e. {200 * se:.2f})" if se is not None else "")


def format_report(report: dict) -> str:
    """The side-by-side table: fused model, each branch alone, handcrafted baseline, per class.

    Branch and class names come from folders or a manifest: they are printed escaped (``printable``)."""
    rows = [("fused model", report["accuracy"], report["macro_f1"])]
    rows += [
        (f"branch {printable(name)} (probe)", m["accuracy"], m["macro_f1"])
        for name, m in report.get("branch_metrics", {}).items()
    ]
    rows += [
        (f"baseline {printable(name)}", m["accuracy"], m["macro_f1"])
        for name, m in report.get("baseline_metrics", {}).items()
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  accuracy  macro-F1   (n={report['n']})"]
    lines += [f"{name:<{width}}  {acc:8.4f}  {f1:8.4f}" for name, acc, f1 in rows]
    margins, se = report.get("margins"), report.get("margin_se", {})
    if margins:
        lines.append(
            f"fused vs best branch: {margin_text(margins['vs_best_branch'], se.get('vs_best_branch'))}; "
            f"vs handcrafted: {margin_text(margins['vs_handcrafted'], se.get('vs_handcrafted'))}"
        )
    lines.append(
        "per-class accuracy: "
        + ", ".join(
            f"{printable(k)}={v:.3f}" if v is not None else f"{printable(k)}=n/a"
            for k, v in report["per_class"].items()
        )
    )
    return "\n".join(lines)
