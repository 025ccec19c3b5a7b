"""``fusion-engine evaluate``: the held-out report of a saved model (fused, each branch, handcrafted, per class),
printed and written as an HTML page beside RUN_DIR."""

from __future__ import annotations

import json

from fusion_engine.artifacts.atomic import atomic_write_bytes
from fusion_engine.cli.common import add_key_options, load_run_dir, report_summary
from fusion_engine.errors import ConfigError
from fusion_engine.training.feature_cache import EXTRACT_RUNTIMES, FeatureCache
from fusion_engine.training.report import report_path, write_report
from fusion_engine.training.report_images import confusion_matrix_chart


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out report of a saved model (printed, and an HTML page)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--data", required=True, help="image folder, .npz file or 'digits'")
    p.add_argument("--cache-dir")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--extract-runtime",
        choices=EXTRACT_RUNTIMES,
        default="auto",
        help="feature extraction: auto (default: onnx on the CPU when its graphs pass the check against torch), "
        "torch, bf16, onnx or int8; the runtime train used hits the features it cached for the same images",
    )
    p.add_argument(
        "--report",
        metavar="PATH",
        help="where to write the HTML report (tables, charts, confusion matrix, mistakes, provenance); "
        "default: RUN_DIR.report.html",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--confusion-png", metavar="PATH", help="also write the confusion matrix alone as a PNG")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    """Held-out report of a saved model: fused, each branch, handcrafted baseline, per class; the HTML page."""
    if args.report and args.no_report:
        raise ConfigError("--report PATH and --no-report contradict each other; give one of them")
    model = load_run_dir(args)
    report = model.evaluate(
        args.data,
        cache=FeatureCache(args.cache_dir, enabled=not args.no_cache, runtime=args.extract_runtime),
        progress=not args.quiet and not args.json,
    )
    written = {}
    if not args.no_report:
        path = args.report or report_path(args.run_dir)
        written["report_html"] = str(
            _writing(
                path,
                "--report",
                write_report,
                report,
                path,
                model=model,
                run_dir=args.run_dir,
                verified=args.public_key is not None,
            )  # fmt: skip
        )
    if args.confusion_png:
        png = confusion_matrix_chart(report["confusion_matrix"], model.class_names)
        _writing(args.confusion_png, "--confusion-png", atomic_write_bytes, args.confusion_png, png)
        written["confusion_png"] = args.confusion_png
    if args.json:
        print(json.dumps({**report_summary(report), **written}))
    else:
        print(report)
        for what, path in written.items():
            print(f"{'report' if what == 'report_html' else 'confusion matrix'}: {path}")
    return 0


def _writing(path, flag: str, write, *args, **options):
    """``write(*args, **options)``; a file that cannot be written is a ConfigError naming ``flag``."""
    try:
        return write(*args, **options) or path
    except OSError as e:
        hint = " (or --no-report)" if flag == "--report" else ""
        raise ConfigError(
            f"cannot write {path}: {e.strerror or e}; choose another path with {flag} PATH{hint}"
        ) from None
