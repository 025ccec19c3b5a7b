"""Compression benchmark: size on disk, CPU latency and held-out top-1 before/after each method.

    python benchmarks/compress.py --data ../shared/data/cifar10_jpeg_train8k.npz --out runs/bench-compress

Trains (frozen backbones, concat head) a fused CIFAR ResNet-20 + MobileNetV2 model on the
training part of a seeded stratified 80/20 split (the split ``fusion-engine train`` makes),
unless ``--out``/base already holds it, then compresses it with each method through the same
API as ``fusion-engine compress``, saves and reloads every variant (the numbers are the
reloaded models'), and measures on the held-out 20%:

- bytes: size of the RUN_DIR on disk (model.safetensors + manifest.json);
- MMACs: multiply-accumulates per image (torch-pruning's counter; int8 layers counted as float);
- images/s: batch 32 of real held-out images, ``--threads`` torch threads for every variant,
  variants timed in interleaved rounds (median), so machine load affects them alike;
- top-1 on the held-out images.

Prints a Markdown table and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_engine import Engine, load
from fusion_engine.artifacts.compression import accuracy, compress, folder_bytes
from fusion_engine.artifacts.pruning import count_macs
from fusion_engine.core.data import collate_images, load_dataset, stratified_split
from fusion_engine.core.network import input_size_for


def base_config(weights: Path) -> dict:
    return {
        "backbones": [
            {
                "name": "cifar_resnet",
                "model": "resnet20",
                "weights": str(weights / "resnet20_cifar10_akamaster.safetensors"),
            },
            {
                "name": "timm",
                "model": "mobilenetv2_100",
                "weights": str(weights / "mobilenetv2_100.tf1_quant_in1k.safetensors"),
                "model_kwargs": {"pad_type": "same"},
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "input_size": 96,
            },
        ],
        "fusion": "concat",
    }


VARIANTS = {  # name -> (methods, recovery fine-tune?)
    "fp16": (["fp16"], False),
    "int8": (["int8"], False),
    "prune, no recovery": (["prune"], False),
    "prune + recovery": (["prune"], True),
    "prune + recovery + int8 + fp16": (["prune", "int8", "fp16"], True),
}


def latency(models: dict, images: torch.Tensor, rounds: int, repeats: int = 3) -> dict:
    """Images/s per model: interleaved rounds, median per-batch time."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):
                model(images)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    model(images)
                times[name].append((time.perf_counter() - start) / repeats)
    return {name: len(images) / statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10_jpeg_train8k.npz"))
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights"))
    parser.add_argument("--out", default="runs/bench-compress")
    parser.add_argument("--ratio", type=float, default=0.3, help="prune: share of channels removed per prunable layer")
    parser.add_argument("--epochs", type=int, default=1, help="recovery fine-tune epochs")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch threads for the latency measurement (one column per value)",
    )
    parser.add_argument("--device", default="cpu", help="where training and the recovery fine-tune run (cpu, cuda)")
    parser.add_argument("--train-threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    data = load_dataset(args.data)
    train, test = stratified_split(data, 0.2, args.seed)
    print(f"data: {data.name}: {len(train)} training, {len(test)} held-out images", file=sys.stderr)
    torch.set_num_threads(args.train_threads)
    engine = Engine.from_plugins()
    base_dir = out / "base"
    if not (base_dir / "manifest.json").is_file():
        torch.manual_seed(args.seed)
        model = engine.build(base_config(Path(args.weights)), class_names=data.classes)
        model.fit(
            train,
            epochs=30,
            baselines=False,
            use_cache=False,
            progress=False,
            log=lambda *a, **k: None,
            seed=args.seed,
            device=args.device,
        )
        model.save(base_dir)
    rows = {"base": {"dir": base_dir, "methods": []}}
    for name, (methods, recovery) in VARIANTS.items():
        folder = out / name.replace(" + ", "+").replace(", ", "-").replace(" ", "_")
        model = load(base_dir, engine=engine)
        start = time.perf_counter()
        compress(
            model,
            methods,
            train=train if recovery else None,
            ratio=args.ratio,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
            log=lambda *a, **k: print(*a, file=sys.stderr),
            progress=False,
        )
        model.save(folder)
        rows[name] = {"dir": folder, "methods": methods, "compress_seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: compressed in {rows[name]['compress_seconds']} s", file=sys.stderr)

    models = {name: load(row["dir"], engine=engine) for name, row in rows.items()}
    for name, model in models.items():
        row = rows[name]
        row["bytes"] = folder_bytes(row["dir"])
        row["accuracy"] = accuracy(model, test)
        try:
            row["mmacs"] = round(count_macs(model)[0] / 1e6, 1)
        except Exception:  # the counter does not know torch's int8 layers: take the pruned float count
            steps = model.extras.get("compression", [])
            pruned = [s for s in steps if s["method"] == "prune"]
            row["mmacs"] = round(pruned[0]["info"]["macs_after"] / 1e6, 1) if pruned else rows["base"].get("mmacs")
    ref = next(iter(models.values()))
    size = input_size_for(ref)
    images, _ = collate_images([test[i] for i in range(32)], size=size)
    for threads in args.threads:
        torch.set_num_threads(threads)
        speed = latency(models, images, args.rounds)
        for name in rows:
            rows[name].setdefault("images_per_second", {})[threads] = round(speed[name], 1)

    base = rows["base"]
    print(
        f"\n{len(test)} held-out images; latency: batch 32 at {size[0]}x{size[1]}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n"
    )
    speed_columns = " | ".join(f"images/s, {t} thread{'s' if t > 1 else ''}" for t in args.threads)
    print(f"| model | size on disk | MMACs/image | {speed_columns} | held-out top-1 |")
    print("|---|---|---|" + "---|" * len(args.threads) + "---|")
    for name, row in rows.items():
        speeds = " | ".join(
            f"{row['images_per_second'][t]} ({row['images_per_second'][t] / base['images_per_second'][t]:.2f}x)"
            for t in args.threads
        )
        print(
            f"| {name} | {row['bytes'] / 1e6:.2f} MB ({row['bytes'] / base['bytes']:.2f}x) | {row['mmacs']} | "
            f"{speeds} | {row['accuracy']:.4f} ({100 * (row['accuracy'] - base['accuracy']):+.2f} pt) |"
        )
    (out / "results.json").write_text(json.dumps({k: {**v, "dir": str(v["dir"])} for k, v in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
