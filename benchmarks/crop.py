"""Squash resize (what fusion-engine's preprocessing does) against timm's eval transform (shorter side to
size / crop_pct, centre crop), same MobileNetV2 weights, only the resize differing.

    OMP_NUM_THREADS=1 python benchmarks/crop.py --shared ../shared

Measures ImageNet top-1 with the pretrained classifier on the 1000-image sample (square, and cut to 4:3),
and a logistic-regression probe on frozen features on CIFAR-10 JPEG (2000 training, 1000 held-out images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def preprocess(images: np.ndarray, mode: str, crop_pct: float, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if mode == "squash":
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:
        h, w = x.shape[-2:]
        short = int(size / crop_pct)
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    return (x - 0.5) / 0.5


def outputs(model, images, mode, crop_pct, logits: bool) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 50):
            features = model.forward_features(preprocess(images[i : i + 50], mode, crop_pct))
            out.append(model.forward_head(features, pre_logits=not logits))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="the shared folder (weights/, data/)")
    args = parser.parse_args()
    shared = Path(args.shared)
    torch.set_num_threads(1)
    weights = shared / "weights" / "mobilenetv2_100.tf1_quant_in1k.safetensors"
    model = timm.create_model(
        "mobilenetv2_100",
        pretrained=True,
        pad_type="same",
        pretrained_cfg_overlay=dict(file=str(weights), mean=(0.5,) * 3, std=(0.5,) * 3),
    ).eval()
    crop_pct = timm.get_pretrained_cfg("mobilenetv2_100").crop_pct
    results = {"crop_pct": crop_pct}
    sample = np.load(shared / "data" / "imagenet_sample1000_112px.npz")
    for shape, images in (("square", sample["x"]), ("4:3", np.ascontiguousarray(sample["x"][:, 14:98]))):
        for mode in ("squash", "crop"):
            top1 = (outputs(model, images, mode, crop_pct, logits=True).argmax(1) == sample["y"]).mean()
            results[f"imagenet_{shape}_top1_{mode}"] = round(float(top1), 4)
            print(results, flush=True)
    cifar = np.load(shared / "data" / "cifar10_jpeg_train8k.npz")
    fit, held = train_test_split(
        np.arange(len(cifar["y"])), train_size=2000, test_size=1000, stratify=cifar["y"], random_state=0
    )
    for mode in ("squash", "crop"):
        train_x = outputs(model, cifar["x"][fit], mode, crop_pct, logits=False)
        test_x = outputs(model, cifar["x"][held], mode, crop_pct, logits=False)
        scaler = StandardScaler().fit(train_x)
        probe = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(train_x), cifar["y"][fit])
        results[f"cifar_probe_{mode}"] = round(float(probe.score(scaler.transform(test_x), cifar["y"][held])), 4)
        print(results, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
