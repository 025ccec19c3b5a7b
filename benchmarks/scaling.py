"""Frozen-mode extraction throughput with 1 vs 2 processes (torch.distributed, 1 thread each),
beside the raw single-process timm forward of the same backbone on the same images (in NCHW,
and in channels_last, the format extraction runs in on the CPU).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/scaling.py --images 512

Each distributed run starts N workers with torch.distributed.run; each extracts its shard into a
fresh feature cache, rank 0 joins the shards; the time is rank 0's, barrier to barrier.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

MODEL = {"backbones": [{"name": "timm", "model": "mobilenetv2_100", "input_size": 160}]}


def dataset(n: int):
    from fusion_engine.core.data import load_dataset

    x = (np.random.default_rng(0).random((n, 32, 32, 3)) * 255).astype(np.uint8)
    return load_dataset((x, np.arange(n) % 10))


def worker(n: int, cache_dir: str) -> None:
    from fusion_engine import Engine
    from fusion_engine.training import distributed
    from fusion_engine.training.feature_cache import FeatureCache

    distributed.init()
    torch.manual_seed(0)
    model = Engine.from_plugins().build(MODEL, num_classes=10)
    data = dataset(n)
    distributed.barrier()
    start = time.perf_counter()
    FeatureCache(cache_dir).features(model, data, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    if distributed.rank() == 0:
        print(json.dumps({"processes": distributed.world_size(), "images_per_second": n / seconds}))
    distributed.finish()


def raw(n: int, memory_format) -> float:
    """images/s of the timm model's own forward, one process, inputs already preprocessed."""
    from fusion_engine import Engine

    torch.manual_seed(0)
    model = Engine.from_plugins().build(MODEL, num_classes=10)
    timm_model = model.branches[0].backbone.model.eval().to(memory_format=memory_format)
    data = dataset(n)
    inputs = [
        model.preprocessors[0](torch.stack([data[i][0] for i in range(s, min(s + 32, n))]).float() / 255).contiguous(
            memory_format=memory_format
        )
        for s in range(0, n, 32)
    ]
    with torch.inference_mode():
        timm_model(inputs[0])
        start = time.perf_counter()
        for x in inputs:
            timm_model(x)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.images, args.cache_dir)
        return 0
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {
        "raw timm forward, 1 process, NCHW": raw(args.images, torch.contiguous_format),
        "raw timm forward, 1 process, channels_last (as extraction runs on the CPU)": raw(
            args.images, torch.channels_last
        ),
    }
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(n),
                    __file__,
                    "--worker",
                    "--images",
                    str(args.images),
                    "--cache-dir",
                    cache,
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        rows[f"fusion-engine extraction, {n} process{'es' if n > 1 else ''}"] = json.loads(
            out.stdout.strip().splitlines()[-1]
        )["images_per_second"]
    base = rows["raw timm forward, 1 process, channels_last (as extraction runs on the CPU)"]
    print(
        f"{args.images} images 32 px -> mobilenetv2_100 at 160 px, batch 32, 1 thread per process, "
        f"{os.cpu_count()} cores\n\n| run | images/s | vs raw channels_last, 1 process |\n|---|---|---|"
    )
    for name, speed in rows.items():
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
