"""Fine-tuning throughput of a fused model under DistributedDataParallel, fp32 vs bf16 autocast.

    torchrun --standalone --nproc_per_node N benchmarks/ddp_throughput.py --precision bf16

Every rank trains on synthetic 224 px batches (the numbers measure speed, not accuracy):
three MobileNetV2 branches, all layers trainable, AdamW; rank 0 prints images/s over all ranks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fusion_engine import Engine
from fusion_engine.runtime.runtimes import autocast
from fusion_engine.training import distributed
from fusion_engine.training.finetune import unfreeze


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    distributed.init()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    config = {"backbones": [{"name": "timm", "model": "mobilenetv2_100"}] * 3, "fusion": "concat"}
    model = Engine.from_plugins().build(config, num_classes=10)
    unfreeze(model, None)
    model.to(device)
    trainer = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed.active()
        else model
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(args.batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)

    def step():
        with autocast(device, args.precision):
            loss = F.cross_entropy(trainer(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    trainer.train()
    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if distributed.rank() == 0:
        print(
            json.dumps(
                {
                    "precision": args.precision,
                    "world_size": distributed.world_size(),
                    "images_per_second": args.steps * args.batch_size * distributed.world_size() / seconds,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                }
            )
        )
    distributed.finish()


if __name__ == "__main__":
    main()
