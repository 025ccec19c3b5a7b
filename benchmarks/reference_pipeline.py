"""The by-hand pipeline an expert writes in an afternoon: the bar ``fusion-engine train`` is measured against.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/reference_pipeline.py --train train.npz --test test.npz \\
        --backbones mobilenetv2_100.tf1_quant_in1k mobilenetv2_100.tf2_ptq_in1k --threads 1 --json ref.json

For each backbone (a weights-index name: ../shared/weights, --weights-dir or the shipped weights):
timm's model with its weights, float32, channels_last, ``torch.inference_mode``, batch 64, fed by
timm's own eval transforms (``timm.data.resolve_data_config`` + ``create_transform``, with the weights'
mean, std and interpolation and the given input size) from PIL images of every training and held-out
image. Then scikit-learn: ``StandardScaler`` + ``LogisticRegression`` on the concatenated features,
C chosen by 3-fold stratified CV (``GridSearchCV`` over a small grid, the scaler inside each fold).
Prints (and writes with --json) the wall time of each phase, images/s and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

C_GRID = [0.01, 0.1, 1.0, 10.0]


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as d:
        return d["x"], d["y"]


def entry_for(name: str, weights_dir: str | None) -> dict:
    """The index.json entry of ``name`` with its file's full path: --weights-dir first, then the shipped weights."""
    folders = [Path(weights_dir)] if weights_dir else []
    try:
        from fusion_engine.core.weights_index import shipped_folders

        folders += [folder for folder, _ in shipped_folders()]
    except ImportError:
        pass
    for folder in folders:
        index = folder / "index.json"
        if index.is_file():
            entries = json.loads(index.read_text())
            if name in entries:
                return {**entries[name], "path": str(folder / entries[name]["file"])}
    raise SystemExit(f"weights {name!r} not found in {[str(f) for f in folders]}")


def backbone(name: str, weights_dir: str | None, input_size: int):
    """``(model, transform)``: the timm model with the weights, and timm's eval transform at ``input_size``."""
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    entry = entry_for(name, weights_dir)
    arch = entry["architecture"].split(":", 1)[1] if entry["architecture"].startswith("timm:") else name.split(".")[0]
    model = timm.create_model(arch, pretrained=False, num_classes=0, **entry.get("timm_kwargs", {}))
    state = {k: v for k, v in load_file(entry["path"]).items() if k in model.state_dict()}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SystemExit(f"{name}: weights lack {sorted(missing)[:5]}")
    model.load_state_dict(state)
    model = model.eval().to(memory_format=torch.channels_last)
    overrides = {"input_size": (3, input_size, input_size)}
    overrides.update({k: entry[k] for k in ("mean", "std", "interpolation") if k in entry})
    config = resolve_data_config(overrides, model=model)
    return model, create_transform(**config, is_training=False)


def extract(model, transform, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Features of every image: PIL image -> timm eval transform -> forward, in batches."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [transform(Image.fromarray(im).convert("RGB")) for im in images[start : start + batch_size]]
            )
            out.append(model(batch.contiguous(memory_format=torch.channels_last)).float().numpy())
    return np.concatenate(out)


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    x_train, y_train = load(args.train)
    x_test, y_test = load(args.test)
    phases, train_feats, test_feats = {}, [], []
    for name in args.backbones:
        start = time.perf_counter()
        model, transform = backbone(name, args.weights_dir, args.input_size)
        train_feats.append(extract(model, transform, x_train, args.batch_size))
        test_feats.append(extract(model, transform, x_test, args.batch_size))
        phases[f"decode+extract {name}"] = time.perf_counter() - start
    extract_seconds = sum(phases.values())

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=args.max_iter))
    search = GridSearchCV(
        pipeline,
        {"logisticregression__C": C_GRID},
        cv=StratifiedKFold(3, shuffle=True, random_state=args.seed),
        n_jobs=1,
    )
    search.fit(np.concatenate(train_feats, axis=1), y_train)
    phases["fit (scaler + logistic regression, C by 3-fold CV)"] = fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = float((search.predict(np.concatenate(test_feats, axis=1)) == y_test).mean())
    phases["predict held-out"] = time.perf_counter() - start
    total = sum(phases.values())
    n_images = len(x_train) + len(x_test)
    return {
        "pipeline": "reference",
        "threads": torch.get_num_threads(),
        "backbones": args.backbones,
        "input_size": args.input_size,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "extract_seconds": round(extract_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "total_seconds": round(total, 2),
        "extract_images_per_second": round(n_images * len(args.backbones) / extract_seconds, 2),
        "images_per_second": round(n_images / total, 2),
        "C": search.best_params_["logisticregression__C"],
        "held_out_accuracy": accuracy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help=".npz with x (N, H, W[, 3]) uint8 and y")
    parser.add_argument("--test", required=True, help="held-out .npz, same layout")
    parser.add_argument("--backbones", nargs="+", required=True, help="weights-index names")
    parser.add_argument("--weights-dir", default=os.environ.get("FUSION_ENGINE_WEIGHTS_DIR"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
