"""Held-out accuracy and extraction speed of the default fused model per branch input size.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/input_size.py --dataset cifar --limit 4000   # and --dataset usps

The default model's CNN branches (the three MobileNets that fusion-engine-weights ships, concat, frozen,
no handcrafted branch so that only the CNN input size varies) trained at each size on the same seeded
split; accuracy on the held-out part. Images/s is measured side by side: one batch of real images
through the three branches at each size, the sizes interleaved over several rounds (best round kept), so
a busy machine slows every size alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.core.data import image_batch
from fusion_engine.training.feature_cache import FeatureCache

SHIPPED = ["mobilenetv2_100.tf1_quant_in1k", "mobilenetv1_050.tf1_quant_in1k", "mobilenetv1_075.tf1_quant_in1k"]
SIZES = [32, 64, 96, 128, 160, 224]


def config(size: int | None) -> dict:
    options = {} if size is None else {"input_size": size}
    return {"backbones": [{"name": "timm", "weights": w, **options} for w in SHIPPED], "fusion": "concat"}


@torch.inference_mode()
def images_per_second(models: dict, images: torch.Tensor, rounds: int) -> dict:
    """Best-of-``rounds`` images/s of each model's branches on ``images``, sizes interleaved."""
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for size, model in models.items():
            start = time.perf_counter()
            model.branch_features(images)
            best[size] = max(best[size], len(images) / (time.perf_counter() - start))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-only", action="store_true", help="measure images/s only (no training)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    data, train, test = held_out_split(args)
    native = tuple(train[0][0].shape[-2:])
    print(
        f"{args.dataset}: {len(train)} train / {len(test)} held-out, native {native[0]}x{native[1]} px; "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    engine = Engine.from_plugins()
    cache = FeatureCache(args.cache_dir)
    models, rows = {}, []
    for size in args.sizes:
        torch.manual_seed(args.seed)
        model = engine.build(config(size), class_names=data.classes)
        if args.speed_only:
            models[size] = model.eval()
            continue
        history = model.fit(train, cache_dir=args.cache_dir, progress=False, log=lambda *a: None, seed=args.seed)
        report = model.evaluate(test, cache=cache, progress=False)
        models[size] = model.eval()
        branches = {name: round(acc, 4) for name, acc in report.get("branches", {}).items()}
        rows.append({"size": size, "accuracy": report["accuracy"], "branches": branches, **history_times(history)})
        print(f"{size} px: fused {report['accuracy']:.4f} {branches}", file=sys.stderr, flush=True)
    batch = image_batch([train[i][0] for i in range(64)], size=native)
    speed = images_per_second(models, batch, args.rounds)
    reference = speed[max(speed)]
    print(f"\n| input size | held-out accuracy (fused) | best branch | images/s (3 branches) | vs {max(speed)} px |")
    print("|---|---|---|---|---|")
    rows = rows or [{"size": size, "accuracy": float("nan"), "branches": {}} for size in models]
    for row in rows:
        row["images_per_second"] = round(speed[row["size"]], 1)
        best_branch = max(row["branches"].values(), default=float("nan"))
        print(
            f"| {row['size']} px | {row['accuracy']:.4f} | {best_branch:.4f} | {speed[row['size']]:.1f} | "
            f"{speed[row['size']] / reference:.2f}x |"
        )
    n = len(test)
    print(
        f"\n{n} held-out images: two standard errors of a difference near 0.75 accuracy = "
        f"{2 * (2 * 0.75 * 0.25 / n) ** 0.5 * 100:.1f} points"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "native": native, "rows": rows}, f, indent=1)
    return 0


def history_times(history: dict) -> dict:
    return {"extract_seconds": history.get("extract_seconds"), "head_seconds": history.get("head_seconds")}


if __name__ == "__main__":
    raise SystemExit(main())
