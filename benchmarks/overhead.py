"""Cost of fusion on top of the backbones: fused images/s vs the same timm backbones run alone.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead.py --threads 2

Measured side by side in one process, interleaved (A, B, A, B, ...) so machine load hits
both equally; the median of the per-round ratios is reported. Reference = each timm
model's own forward (``num_classes=0``: features + pooling) on inputs already at its size
and normalisation; fused = the whole FusedClassifier from plain [0, 1] images (shared
preprocessing, extractors, fusion head). Also: frozen-mode feature extraction (the
FeatureCache path from a uint8 dataset) vs the raw timm forward over the same images in the
same memory format (extraction runs channels_last on the CPU), and channels_last vs NCHW.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch

from fusion_engine import Engine
from fusion_engine.core.data import load_dataset
from fusion_engine.training.feature_cache import FeatureCache

MODELS = ["mobilenetv2_100", "resnet18", "efficientnet_b0"]


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def compare(fns, rounds: int, repeats: int) -> tuple[list[float], list[float]]:
    """Median seconds of each function and the median per-round speed of each relative to the first."""
    for fn in fns:  # warm-up
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(timed(fn, repeats))
    medians = [statistics.median(t) for t in times]
    return medians, [statistics.median(a / b for a, b in zip(times[0], t)) for t in times]


def fused_vs_raw(engine, models, size: int, batch: int, rounds: int, repeats: int) -> dict:
    torch.manual_seed(0)
    config = {"backbones": [{"name": "timm", "model": m, "input_size": size} for m in models], "fusion": "concat"}
    fused = engine.build(config, num_classes=10).eval()
    raw = [b.backbone.model for b in fused.branches]  # the very same timm modules and weights
    images = torch.rand(batch, 3, size, size)
    normalised = [fused.preprocessors[i](images) for i in fused.preprocess_index]
    with torch.inference_mode():
        (t_raw, t_fused), (_, ratio) = compare(
            [lambda: [m(x) for m, x in zip(raw, normalised)], lambda: fused(images)], rounds, repeats
        )
    return {
        "branches": len(models),
        "size": size,
        "batch": batch,
        "fused_images_per_s": batch / t_fused,
        "raw_images_per_s": batch / t_raw,
        "fused_over_raw_speed": ratio,
    }


def extraction_vs_raw(engine, model_name: str, size: int, batch: int, n: int, rounds: int) -> dict:
    """Extraction (the FeatureCache path from a uint8 dataset) vs the raw timm forward in the same memory
    format (channels_last on the CPU, as extraction runs), and that format's gain over NCHW."""
    torch.manual_seed(0)
    fused = engine.build({"backbones": [{"name": "timm", "model": model_name, "input_size": size}]}, num_classes=10)
    x = (np.random.default_rng(0).random((n, size, size, 3)) * 255).astype(np.uint8)
    dataset = load_dataset((x, np.arange(n) % 10))
    pre = fused.preprocessors[0]
    nchw_model = fused.branches[0].backbone.model.eval()
    cl_model = copy.deepcopy(nchw_model).to(memory_format=torch.channels_last)
    nchw = [
        pre(torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2).contiguous().float() / 255)
        for i in range(0, n, batch)
    ]
    cl = [t.contiguous(memory_format=torch.channels_last) for t in nchw]

    def extract():
        FeatureCache(enabled=False).features(fused, dataset, batch_size=batch, progress=False)

    def forward(model, inputs):
        def run():
            with torch.inference_mode():
                for t in inputs:
                    model(t)

        return run

    (t_raw, t_extract, t_nchw), (_, ratio, nchw_ratio) = compare(
        [forward(cl_model, cl), extract, forward(nchw_model, nchw)], rounds, 1
    )
    return {
        "model": model_name,
        "size": size,
        "batch": batch,
        "images": n,
        "extract_images_per_s": n / t_extract,
        "raw_images_per_s": n / t_raw,
        "extract_over_raw_speed": ratio,
        "raw_nchw_images_per_s": n / t_nchw,
        "channels_last_over_nchw_speed": 1 / nchw_ratio,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--extraction-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_plugins()
    print(f"torch {torch.__version__}, {args.threads} threads; ratios are medians of {args.rounds} interleaved rounds")
    print(
        "\n| branches | input | batch | fused img/s | backbones alone img/s | fused / alone |\n|---|---|---|---|---|---|"
    )
    for size, batch, repeats in () if args.extraction_only else ((224, 32, 1), (32, 256, 3)):
        for k in (2, 3):
            r = fused_vs_raw(engine, MODELS[:k], size, batch, args.rounds, repeats)
            print(
                f"| {k} ({', '.join(MODELS[:k])}) | {size} px | {batch} | {r['fused_images_per_s']:.1f} | "
                f"{r['raw_images_per_s']:.1f} | {r['fused_over_raw_speed']:.3f} |",
                flush=True,
            )
    print(
        "\n| backbone | input | batch | extraction img/s | raw timm img/s (channels_last) | extraction / raw | "
        "raw timm img/s (NCHW) | channels_last / NCHW |\n|---|---|---|---|---|---|---|---|"
    )
    for name in MODELS[:2]:
        r = extraction_vs_raw(engine, name, 224, 32, 128, args.rounds)
        print(
            f"| {name} | 224 px | 32 | {r['extract_images_per_s']:.1f} | {r['raw_images_per_s']:.1f} | "
            f"{r['extract_over_raw_speed']:.3f} | {r['raw_nchw_images_per_s']:.1f} | "
            f"{r['channels_last_over_nchw_speed']:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
