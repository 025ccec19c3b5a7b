"""``fusion-engine predict``: top-k classes and probabilities per image, with torch or onnxruntime."""

from __future__ import annotations

import functools
import json
import sys
import time

from fusion_engine.cli.common import add_key_options, load_run_dir
from fusion_engine.runtime.prediction import format_predictions, predict_files, predict_onnx_files


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a saved model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_key_options(
        p,
        public_key="refuse RUN_DIR (or a .onnx file, checked against FILE.onnx.sig) unless signed by this "
        "Ed25519 public key",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: run with onnxruntime; RUN_DIR may then be a .onnx file from `export`",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    """Top-k classes and probabilities per image."""
    # an exported .onnx file (checked against its signature with --public-key), or RUN_DIR exported in
    # memory, run by onnxruntime; else torch
    options = {"top_k": args.top_k, "batch_size": args.batch_size, "workers": args.workers}
    if args.runtime == "onnx" and args.run_dir.endswith(".onnx"):
        predictor = functools.partial(predict_onnx_files, args.run_dir, public_key=args.public_key)
    else:
        model = load_run_dir(args)
        predictor = functools.partial(predict_onnx_files if args.runtime == "onnx" else predict_files, model)
    start = time.perf_counter()
    results = predictor(args.images, **options)
    seconds = time.perf_counter() - start
    print(
        f"predicted {len(results)} images in {seconds:.2f} s ({len(results) / max(seconds, 1e-9):.1f} images/s)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(results))
    elif results:
        print(format_predictions(results))
    return 0
