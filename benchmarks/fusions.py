"""Held-out accuracy of every built-in fusion, trained on features extracted once, and of feature views.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/fusions.py extract --dataset cifar   # once (slow), then
    OMP_WAIT_POLICY=PASSIVE python benchmarks/fusions.py fusions --dataset cifar   # every fusion (fast)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/fusions.py views --dataset cifar     # flip/shift views

``extract`` runs 3 pretrained MobileNetV2s (ImageNet x2, iNaturalist birds) through the engine's
feature cache (``--cache-dir``, default /work/cache/fusions; onnxruntime extraction) on the seeded
held-out split of benchmarks/shared_data.py (CIFAR 6000/2000, USPS 5291/2000), for the original
images and for each of ``--views``, and also saves the arrays to ``FEATURES-DATASET.npz`` in the cache
folder, so later runs need neither the images nor the cache key. ``fusions`` trains each fusion as
fit() does in frozen mode (the same seeded validation split, train_head or fusion.fit) and prints
held-out accuracy with the two-standard-error band; ``views`` trains concat with each view added to
the training rows and with test-time flip averaging.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from shared_data import SHARED, add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.core.data import ArrayImageDataset, stratified_split
from fusion_engine.training.config import TrainConfig, seed_everything
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.fit import train_head
from fusion_engine.training.views import ViewDataset, stacked

WEIGHTS = ["mobilenetv2_100.tf1_quant_in1k", "mobilenetv2_100.tf2_ptq_in1k", "mobilenetv2_100.tf1_quant_inat_bird"]
FUSIONS = ["concat", "attention", "gated", "vote", "stacking"]


def model_config(fusion="concat") -> dict:
    return {
        "backbones": [{"name": "timm", "weights": w, "label": w.split(".", 1)[1]} for w in WEIGHTS],
        "fusion": fusion,
    }


def npz_path(args) -> Path:
    return Path(args.cache_dir) / f"FEATURES-{args.dataset}-seed{args.seed}.npz"


def extract(args) -> None:
    data, train, test = held_out_split(args)
    engine = Engine.from_plugins()
    model = engine.build(model_config(), class_names=data.classes)
    cache = FeatureCache(args.cache_dir, runtime=args.extract_runtime)
    out = load_features(args) if npz_path(args).exists() else {}  # parts saved earlier are kept, not redone
    out.update({"y_train": train.targets, "y_test": test.targets})
    parts = [("", train, test)] + [(v, ViewDataset(train, v), ViewDataset(test, v)) for v in args.views]
    for view, tr, te in parts:
        for split, ds in (("train", tr), ("test", te)):
            name = f"{split}{'_' + view if view else ''}"
            if (view == "shift" and split == "test") or f"{name}_0" in out:
                continue  # a shifted test view is not used; a part already saved is not extracted again
            start = time.perf_counter()
            feats = cache.features(model, ds, batch_size=64, device="cpu", progress=False)
            for i, f in enumerate(feats):
                out[f"{name}_{i}"] = np.asarray(f)
            print(f"{args.dataset} {split} {view or 'original'}: {time.perf_counter() - start:.0f} s", flush=True)
            with open(f"{npz_path(args)}.tmp", "wb") as f:  # after every part: an interrupted run keeps what it has
                np.savez(f, **out)
            os.replace(f"{npz_path(args)}.tmp", npz_path(args))
    print(f"saved {npz_path(args)}")


def load_features(args) -> dict:
    with np.load(npz_path(args)) as z:
        return {k: z[k] for k in z.files}


def branches(z, prefix: str) -> list[np.ndarray]:
    return [z[f"{prefix}_{i}"] for i in range(len(WEIGHTS))]


def val_split(y, config: TrainConfig):
    """The row indices fit() trains and validates on: its seeded stratified split, each row tagged with its index."""
    classes = [str(c) for c in range(int(y.max()) + 1)]
    tagged = ArrayImageDataset(torch.arange(len(y)).view(-1, 1, 1, 1), y, classes)
    part, val = stratified_split(tagged, config.val_fraction, config.seed)
    return part.images.view(-1).numpy(), val.images.view(-1).numpy()


def before_factories() -> dict:
    """The fusion factories of the committed fusions.py (git HEAD): the "before" column."""
    source = subprocess.run(
        ["git", "show", "HEAD:fusion_engine/builtins/fusions.py"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("fusions_before")
    exec(compile(source, "fusions_before", "exec"), module.__dict__)
    return {name: getattr(module, name) for name in FUSIONS}


def train_fusion(factory, train_feats, y, val_feats, y_val, num_classes: int, config: TrainConfig):
    """A head trained as fit() trains it in frozen mode (fusion.fit, or train_head with early stopping)."""
    seed_everything(config.seed)
    head = factory([f.shape[1] for f in train_feats], num_classes)
    seed_everything(config.seed)
    if getattr(head, "requires_fit", False):
        head.fit(train_feats, y)
    else:
        train_head(head, train_feats, y, val_feats, y_val, config, torch.device("cpu"), log=lambda *a: None)
    return head


def accuracy(head, feats, y) -> float:
    return float((logits_from_features(head, feats, device=torch.device("cpu")).argmax(1) == y).mean())


def band(acc: float, n: int) -> str:
    return f"{acc:.4f} +- {2 * np.sqrt(acc * (1 - acc) / n):.4f}"


def fusions_stage(args, z, config) -> None:
    y, y_test = z["y_train"], z["y_test"]
    part, val = val_split(y, config)
    train, test = branches(z, "train"), branches(z, "test")
    fit_args = ([f[part] for f in train], y[part], [f[val] for f in train], y[val], int(y.max()) + 1, config)
    engine = Engine.from_plugins()
    columns = {"after": {n: engine.registry.get("fusion", n).factory for n in args.fusions}}
    if args.before:
        columns = {"before": before_factories(), **columns}
    print(f"\n{args.dataset}: {len(part)} train / {len(val)} validation / {len(y_test)} held-out")
    print("| fusion | " + " | ".join(f"{c} (held-out +- 2 SE)" for c in columns) + " | head s |")
    print("|---|" + "---|" * len(columns) + "---|")
    for name in args.fusions:
        cells, seconds = [], 0.0
        for column in columns.values():
            start = time.perf_counter()
            head = train_fusion(column[name], *fit_args)
            seconds = time.perf_counter() - start
            cells.append(band(accuracy(head, test, y_test), len(y_test)))
            if getattr(head, "scores", None):
                print(f"  {name} fit scores: {head.scores}", file=sys.stderr)
            if hasattr(head, "use_meta"):  # stacking: the average of its base classifiers, for comparison
                kept = bool(head.use_meta)
                head.use_meta.fill_(False)
                average = band(accuracy(head, test, y_test), len(y_test))
                head.use_meta.fill_(kept)
                print(f"  {name}: meta kept {kept}; average of its base classifiers {average}", file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} |", flush=True)


def views_stage(args, z, config) -> None:
    """concat trained on the original rows plus each view's rows, scored on the original and on the
    flip-averaged held-out features."""
    y, y_test = z["y_train"], z["y_test"]
    part, val = val_split(y, config)
    engine = Engine.from_plugins()
    factory = engine.registry.get("fusion", args.fusions[0]).factory
    train, test = branches(z, "train"), branches(z, "test")
    have = [v for v in ("flip", "shift") if f"train_{v}_0" in z]
    flip_test = branches(z, "test_flip") if "test_flip_0" in z else None
    flip_train = branches(z, "train_flip") if "train_flip_0" in z else None
    print(f"\n{args.dataset}: fusion {args.fusions[0]}, views extracted: {have}")
    print("| training rows | val | held-out | val, flip-averaged | held-out, flip-averaged |")
    print("|---|---|---|---|---|")
    for combo in [()] + [(v,) for v in have] + ([tuple(have)] if len(have) > 1 else []):
        extra = {v: [f[part] for f in branches(z, f"train_{v}")] for v in combo}
        rows = stacked([f[part] for f in train], extra)
        y_rows = np.concatenate([y[part]] * (1 + len(combo)))
        val_feats = [f[val] for f in train]
        head = train_fusion(factory, rows, y_rows, val_feats, y[val], int(y.max()) + 1, config)
        cells = [band(accuracy(head, val_feats, y[val]), len(val)), band(accuracy(head, test, y_test), len(y_test))]
        if flip_test is not None:
            val_avg = [(a[val] + b[val]) / 2 for a, b in zip(train, flip_train)]
            test_avg = [(a + b) / 2 for a, b in zip(test, flip_test)]
            cells += [
                band(accuracy(head, val_avg, y[val]), len(val)),
                band(accuracy(head, test_avg, y_test), len(y_test)),
            ]
        print(f"| original{''.join(' + ' + v for v in combo)} | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["extract", "fusions", "views"])
    add_split_arguments(parser)
    parser.set_defaults(cache_dir="/work/cache/fusions", device="cpu")
    parser.add_argument("--extract-runtime", default="onnx", choices=["torch", "bf16", "onnx"])
    parser.add_argument("--views", default="flip,shift", type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--fusions", default=",".join(FUSIONS), type=lambda s: s.split(","))
    parser.add_argument("--before", action="store_true", help="also train the committed (git HEAD) fusions")
    args = parser.parse_args()
    print(f"{args.dataset}: {torch.get_num_threads()} threads; data {SHARED / 'data'}", file=sys.stderr)
    if args.stage == "extract":
        extract(args)
        return 0
    return run_stage(args)


def run_stage(args) -> int:
    z = load_features(args)
    config = TrainConfig(seed=args.seed)
    (fusions_stage if args.stage == "fusions" else views_stage)(args, z, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
