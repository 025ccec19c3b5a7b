"""CPU runtimes of a 3-branch fused MobileNetV2 model: images/s, latency and held-out accuracy side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/runtimes.py --cache-dir /work/cache/transfer-cifar

Trains (frozen, concat; the feature cache of benchmarks/transfer.py is reused when --cache-dir
points at it) tf1 + tf2 ImageNet and iNat-birds MobileNetV2 on the 6000 CIFAR-10 JPEG training
images of the seeded split, saves it, and runs ``fusion-engine bench`` on it: every runtime in
its own process, same batch and threads, accuracy on the held-out images (all 2000, or a
stratified subset: --accuracy-images).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine, load
from fusion_engine.artifacts.store import save
from fusion_engine.core.data import stratified_split
from fusion_engine.runtime.bench import benchmark, format_results

BRANCHES = ["mobilenetv2_100.tf1_quant_in1k", "mobilenetv2_100.tf2_ptq_in1k", "mobilenetv2_100.tf1_quant_inat_bird"]
RUNTIMES = ["torch", "channels_last", "bf16", "bf16_channels_last", "compile", "onnx"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--runtime", action="append", help=f"repeatable (default: {', '.join(RUNTIMES)})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--accuracy-images",
        type=int,
        default=2000,
        help="score accuracy on a stratified subset of this many held-out images",
    )
    parser.add_argument("--out", help="folder for the model and the held-out npz (default: a temporary one)")
    args = parser.parse_args()
    data, train, test = held_out_split(args)
    engine = Engine.from_plugins()
    torch.manual_seed(args.seed)
    model = engine.build(
        {"backbones": [{"name": "timm", "weights": b} for b in BRANCHES], "fusion": "concat"}, class_names=data.classes
    )
    model.fit(
        train,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=False,
        log=lambda *a: None,
        seed=args.seed,
        baselines=False,
    )
    folder = Path(args.out or tempfile.mkdtemp(prefix="fusion-engine-runtimes-"))
    save(model, folder / "run")
    if args.accuracy_images < len(test):
        test = stratified_split(test, args.accuracy_images, args.seed)[1]
    np.savez(
        folder / "test.npz", x=test.images.permute(0, 2, 3, 1).numpy(), y=test.targets, classes=np.asarray(test.classes)
    )
    results = benchmark(
        functools.partial(load, folder / "run"),
        args.runtime or RUNTIMES,
        batch_size=args.batch_size,
        iterations=args.iterations,
        threads=args.threads,
        data=str(folder / "test.npz"),
    )
    print(format_results(results))
    base = results[0]
    print(
        f"\n{len(train)} train images; accuracy on {len(test)} held-out {args.dataset} images; batch {args.batch_size}, "
        f"{args.threads} threads, {args.iterations} timed batches per runtime\n\n"
        "| runtime | images/s | vs torch | p50 ms | p95 ms | peak RSS MB | held-out accuracy | change |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        if "error" in r:
            print(f"| {r['runtime']} | failed: {r['error']} | | | | | | |")
            continue
        print(
            f"| {r['runtime']} | {r['images_per_second']:.1f} | {r['images_per_second'] / base['images_per_second']:.2f}x"
            f" | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} | "
            f"{100 * (r['accuracy'] - base['accuracy']):+.2f} pt |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
