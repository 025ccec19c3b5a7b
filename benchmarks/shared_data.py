"""The shared real datasets and the seeded held-out split every accuracy benchmark uses.

CIFAR-10 JPEG 8k: 6000 train / 2000 held-out; USPS 7291: 5291 / 2000; Fashion-MNIST: its 60000 training
images, 2000 held out (stratified, seed 0).
``--limit N`` keeps a stratified subset of N images (quick checks) with a quarter held out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fusion_engine.core.data import load_dataset, stratified_split

SHARED = Path(os.environ.get("FUSION_ENGINE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATASETS = {"cifar": "cifar10_jpeg_train8k.npz", "usps": "usps_train.npz", "fashion": "fashion_mnist.npz"}


def add_split_arguments(parser) -> None:
    """--dataset, --held-out, --limit, --cache-dir, --device, --seed."""
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cifar")
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--limit", type=int, help="use only this many images (quick check)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/fusion-engine/bench-features"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def held_out_split(args):
    """``(data, train, test)`` for the parsed arguments; local weights default to ../shared/weights."""
    os.environ.setdefault("FUSION_ENGINE_WEIGHTS_DIR", str(SHARED / "weights"))
    data = load_dataset(SHARED / "data" / DATASETS[args.dataset])
    if args.limit:
        data, _ = stratified_split(data, len(data) - args.limit, args.seed)
    held_out = min(args.held_out, len(data) // 4) if args.limit else args.held_out
    train, test = stratified_split(data, held_out, args.seed)
    return data, train, test
