"""Frozen-mode extraction runtimes (``fusion-engine train --extract-runtime``): speed and held-out accuracy.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/extraction.py --limit 1000
    OMP_WAIT_POLICY=PASSIVE python benchmarks/extraction.py --limit 1000 --dataset usps --models mobilenetv2 \\
        --runtimes onnx int8
    OMP_WAIT_POLICY=PASSIVE python benchmarks/extraction.py --limit 500 --models mobilenetv2 --runtimes torch onnx \\
        --prefetch 0 2

For each model and runtime (torch: float32, channels_last on the CPU; bf16: bfloat16 autocast; onnx:
onnxruntime float32; int8: onnxruntime static int8), a fused model (that backbone, concat head) is trained
in frozen mode from the features that runtime extracts, then evaluated on held-out images it never saw,
their features extracted by the same runtime (a fresh cache per runtime). Models: MobileNetV2 (tf1 ImageNet
weights, 224 px) and ResNet-18 (random init: speed only, its accuracy means nothing). images/s is the
extraction pass alone (the one-time export, quantisation and parity check are shown apart, as "graph s");
"wait" is the share of the extraction wall time the forward pass spent waiting for decoded, resized
images, with ``--prefetch`` batches decoded ahead by a background thread (0: decoded in the loop).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from shared_data import add_split_arguments, held_out_split

import fusion_engine.runtime.onnx_cache as onnx_cache
import fusion_engine.training.feature_cache as feature_cache
from fusion_engine import Engine
from fusion_engine.training.feature_cache import FeatureCache

MODELS = {
    "mobilenetv2": {"name": "timm", "weights": "mobilenetv2_100.tf1_quant_in1k"},
    "resnet18": {"name": "timm", "model": "resnet18", "pretrained": False, "input_size": 224},
}
RUNTIMES = ("torch", "bf16", "onnx", "int8")


def measure(engine, data, train, test, model_name: str, runtime: str, prefetch: int, args) -> dict:
    feature_cache.PREFETCH_BATCHES = prefetch
    onnx_cache.forget()
    torch.manual_seed(args.seed)
    model = engine.build({"backbones": [MODELS[model_name]], "fusion": "concat"}, class_names=data.classes)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        history = model.fit(
            train,
            extract_runtime=runtime,
            cache_dir=cache_dir,
            baselines=False,
            progress=False,
            log=lines.append,
            seed=args.seed,
            device=args.device,
        )
        seconds = time.perf_counter() - start
        held_out = FeatureCache(cache_dir, runtime=runtime)  # the graphs fit made, from disk
        accuracy = model.evaluate(test, cache=held_out, progress=False)["accuracy"]
    stats = history["cache"]
    graph_seconds = sum(r.get("make_seconds", 0) for r in held_out.checks.values())
    return {
        "model": model_name,
        "runtime": runtime,
        "used": "+".join(sorted({p.runtime for p in held_out.plans})),
        "prefetch": prefetch,
        "images_per_second": (history["n_train"] + history["n_val"]) / history["extract_seconds"],
        "wait_share": stats.get("wait_seconds", 0.0) / max(stats["extract_seconds"], 1e-9),
        "graph_seconds": graph_seconds,
        "fit_seconds": seconds,
        "accuracy": accuracy,
        "checks": [line for line in lines if "graph" in line],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mobilenetv2", "resnet18"])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--prefetch", nargs="+", type=int, default=[feature_cache.PREFETCH_BATCHES])
    parser.add_argument(
        "--unchecked-int8",
        action="store_true",
        help="use int8 graphs even when they fail the parity check (to measure them)",
    )
    args = parser.parse_args()
    if args.unchecked_int8:
        feature_cache.INT8_MIN_COSINE = -1.0
    torch.set_num_threads(args.threads)
    data, train, test = held_out_split(args)
    engine = Engine.from_plugins()
    rows = []
    for model_name in args.models:
        for runtime in args.runtimes:
            for prefetch in args.prefetch:
                rows.append(measure(engine, data, train, test, model_name, runtime, prefetch, args))
                print(f"{rows[-1]}", file=sys.stderr, flush=True)
    print(
        f"{len(train)} training images ({args.dataset}; 85% extracted for training, 15% for validation), batch 64, "
        f"{args.threads} threads, {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY passive; accuracy on "
        f"{len(test)} held-out images\n\n| model | runtime (used) | prefetch | images/s | vs first | wait for images "
        "| graph s | held-out accuracy | change |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"])
        print(
            f"| {r['model']} | {r['runtime']} ({r['used']}) | {r['prefetch']} | {r['images_per_second']:.1f} | "
            f"{r['images_per_second'] / base['images_per_second']:.2f}x | {100 * r['wait_share']:.1f}% | "
            f"{r['graph_seconds']:.0f} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - base['accuracy']):+.2f} pt |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
