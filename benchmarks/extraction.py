"""Frozen-mode extraction runtimes (``fusion-engine train --extract-runtime``): speed and held-out accuracy.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/extraction.py --limit 2000

For each runtime (torch: float32, channels_last on the CPU; bf16: bfloat16 autocast; onnx:
onnxruntime), the same fused model (MobileNetV2 tf1 ImageNet weights, concat head) is trained in
frozen mode from features that runtime extracts (no cache), then evaluated as it is deployed: torch
float32, on held-out images it never saw (their features extracted once, by torch, shared).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.training.feature_cache import EXTRACT_RUNTIMES, FeatureCache

BRANCH = "mobilenetv2_100.tf1_quant_in1k"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, train, test = held_out_split(args)
    engine = Engine.from_plugins()
    rows = []
    with tempfile.TemporaryDirectory() as held_out_cache:
        for runtime in EXTRACT_RUNTIMES:
            torch.manual_seed(args.seed)
            model = engine.build(
                {"backbones": [{"name": "timm", "weights": BRANCH}], "fusion": "concat"}, class_names=data.classes
            )
            start = time.perf_counter()
            history = model.fit(
                train,
                extract_runtime=runtime,
                use_cache=False,
                baselines=False,
                progress=False,
                log=lambda *a: None,
                seed=args.seed,
                device=args.device,
            )
            seconds = time.perf_counter() - start
            accuracy = model.evaluate(test, cache=FeatureCache(held_out_cache), progress=False)["accuracy"]
            rows.append(
                {
                    "runtime": runtime,
                    "images_per_second": len(train) / history["extract_seconds"],
                    "extract_seconds": history["extract_seconds"],
                    "fit_seconds": seconds,
                    "accuracy": accuracy,
                }
            )
            print(f"{runtime}: {rows[-1]}", file=sys.stderr, flush=True)
    base = rows[0]
    print(
        f"{len(train)} training images ({args.dataset}) through {BRANCH} at 224 px, batch 64, {args.threads} threads; "
        f"accuracy on {len(test)} held-out images\n\n| extraction runtime | images/s | vs torch | held-out accuracy | "
        "change |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['runtime']} | {r['images_per_second']:.1f} | {r['images_per_second'] / base['images_per_second']:.2f}x"
            f" | {r['accuracy']:.4f} | {100 * (r['accuracy'] - base['accuracy']):+.2f} pt |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
