"""``fusion-engine evaluate``: the held-out report of a saved model (fused, each branch, handcrafted, per class)."""

from __future__ import annotations

import json

from fusion_engine.cli.common import add_key_options, load_run_dir, report_summary
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.metrics import format_report


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out report of a saved model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--data", required=True, help="image folder, .npz file or 'digits'")
    p.add_argument("--cache-dir")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--confusion-png", help="where to write the confusion matrix (needs matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    """Held-out report of a saved model: fused, each branch, handcrafted baseline, per class."""
    model = load_run_dir(args)
    report = model.evaluate(
        args.data,
        cache=FeatureCache(args.cache_dir, enabled=not args.no_cache),
        progress=not args.quiet and not args.json,
    )
    if args.json:
        print(json.dumps(report_summary(report)))
    else:
        print(format_report(report))
    plot = _confusion_png(report, model.class_names, args.confusion_png or f"{args.run_dir.rstrip('/')}.confusion.png")
    if plot and not args.json:
        print(f"confusion matrix: {plot}")
    return 0


def _confusion_png(report: dict, class_names, path):
    """Write the confusion matrix as an image when matplotlib is installed; return the path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 1 + 0.5 * len(class_names)))
    ax.imshow(report["confusion_matrix"], cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
