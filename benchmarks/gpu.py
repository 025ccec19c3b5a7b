"""The GPU checks, in one prepared script (issues 6 and 7):

    FUSION_ENGINE_SHARED=DIR python benchmarks/gpu.py --out RESULTS.json

1. A 3-branch fused MobileNetV2 model (tf1 + tf2 ImageNet, iNat birds; concat) trained in frozen
   mode on CIFAR-10 JPEG (6000 train, the same seeded split as benchmarks/transfer.py), then the
   runtimes fp32 / channels_last / bf16 / bf16 + channels_last at batch 128: images/s and
   held-out accuracy on the 2000 held-out images.
2. DDP fine-tuning throughput, fp32 vs bf16 autocast (benchmarks/ddp_throughput.py under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from shared_data import SHARED

from fusion_engine import Engine
from fusion_engine.core.data import load_dataset, stratified_split, to_float_images
from fusion_engine.runtime.runtimes import make_runner

BRANCHES = ["mobilenetv2_100.tf1_quant_in1k", "mobilenetv2_100.tf2_ptq_in1k", "mobilenetv2_100.tf1_quant_inat_bird"]


def runtime_table(device, limit: int | None) -> list[dict]:
    os.environ["FUSION_ENGINE_WEIGHTS_DIR"] = str(SHARED / "weights")
    data = load_dataset(SHARED / "data" / "cifar10_jpeg_train8k.npz")
    if limit:  # a quick smoke run
        data = stratified_split(data, len(data) - limit, 0)[0]
    train, test = stratified_split(data, 2000 if not limit else limit // 4, 0)
    torch.manual_seed(0)
    model = Engine.from_plugins().build(
        {"backbones": [{"name": "timm", "weights": b} for b in BRANCHES], "fusion": "concat"}, class_names=data.classes
    )
    start = time.perf_counter()
    history = model.fit(
        train, device=str(device), progress=False, log=lambda *a: None, use_cache=False, baselines=False
    )
    print(
        f"frozen training on {device}: {time.perf_counter() - start:.1f} s (extraction {history['extract_seconds']} s)",
        flush=True,
    )
    model.to(device).eval()
    x = to_float_images(torch.stack([test[i][0] for i in range(len(test))]))
    y = torch.as_tensor(test.targets)
    rows = []
    for runtime in ("torch", "channels_last", "bf16", "bf16_channels_last"):
        run = make_runner(model, runtime)
        batches = [x[i : i + 128].to(device) for i in range(0, len(x), 128)]
        for b in batches[:3]:
            run(b)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        preds = [run(b).argmax(1).cpu() for b in batches]
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        accuracy = float((torch.cat(preds) == y).float().mean())
        rows.append({"runtime": runtime, "images_per_second": len(x) / seconds, "accuracy": accuracy})
        print(f"| {runtime} | {len(x) / seconds:.0f} | {accuracy:.4f} |", flush=True)
        model.to(memory_format=torch.contiguous_format)
    return rows


def ddp_table() -> list[dict]:
    rows = []
    script = Path(__file__).with_name("ddp_throughput.py")
    for precision in ("fp32", "bf16"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                str(script),
                "--precision",
                precision,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = [text for text in out.stdout.splitlines() if text.startswith("{")]
        rows.append(json.loads(line[-1]) if line else {"precision": precision, "error": out.stderr[-1500:]})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--limit", type=int, help="use only this many images (smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device: {name}, torch {torch.__version__}\n\n| runtime | images/s (batch 128) | held-out accuracy |\n|---|---|---|",
        flush=True,
    )
    results = {
        "device": name,
        "torch": torch.__version__,
        "runtimes": runtime_table(device, args.limit),
        "ddp": ddp_table(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
