"""``fusion-engine predict``: top-k classes and probabilities per image, with torch or onnxruntime."""

from __future__ import annotations

import json
import sys
import time

from fusion_engine.cli.common import add_key_options, load_run_dir
from fusion_engine.runtime.prediction import predict_files, predict_onnx_files


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a saved model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_key_options(p)
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
    # an exported .onnx file, or RUN_DIR exported in memory, run by onnxruntime; else torch
    predictor = predict_onnx_files if args.runtime == "onnx" else predict_files
    model = args.run_dir if args.runtime == "onnx" and args.run_dir.endswith(".onnx") else load_run_dir(args)
    start = time.perf_counter()
    results = predictor(model, args.images, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers)
    seconds = time.perf_counter() - start
    print(
        f"predicted {len(results)} images in {seconds:.2f} s ({len(results) / max(seconds, 1e-9):.1f} images/s)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["top"]))
    return 0
