"""``fusion-engine train`` (frozen) against the by-hand pipeline (reference_pipeline.py), side by side.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/vs_reference.py --threads 1      # the full CIFAR measurement
    OMP_WAIT_POLICY=PASSIVE python benchmarks/vs_reference.py --threads 2 --limit 400   # a quick check

Data: CIFAR-10 JPEG 8k, the seeded 6000/2000 split of shared_data.py (``--limit N``: a stratified N-image
subset, a quarter held out), written once as train.npz and test.npz (x, y, classes) in a work folder.
Both pipelines get the same three MobileNetV2 weights (../shared/weights or the shipped ones) at the
same input size and run as subprocesses of this script, one after the other, with
OMP_NUM_THREADS/MKL_NUM_THREADS = --threads (and torch.set_num_threads in the reference):

- reference: timm forward (float32, channels_last, inference_mode, batch 64, timm's eval transforms)
  + StandardScaler + LogisticRegression with C by 3-fold CV (benchmarks/reference_pipeline.py);
- engine: ``fusion-engine train --config CFG --data train.npz --data-test test.npz --cache-dir FRESH
  --no-baselines --json``, CFG = the three branches ``{"name": "timm", "weights": NAME, "input_size": S}``.

Prints a markdown table: phase wall times, images/s, held-out accuracy of both, the end-to-end ratio
(reference wall / engine wall, each the whole subprocess) and the 2-standard-error band of the
accuracy difference (two independent binomial errors on the held-out images: conservative).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from shared_data import SHARED, add_split_arguments, held_out_split

HERE = Path(__file__).resolve().parent
BACKBONES = [
    "mobilenetv2_100.tf1_quant_in1k",
    "mobilenetv2_100.tf2_ptq_in1k",
    "mobilenetv2_100.tf1_quant_inat_bird",
]


def write_split(train, test, folder: Path) -> tuple[Path, Path]:
    """The split as two .npz files (x uint8 images (N, H, W, C), y labels, classes) that the CLI and the
    reference read; the datasets hold their images as (N, C, H, W) tensors."""
    paths = []
    for name, part in (("train", train), ("test", test)):
        path = folder / f"{name}.npz"
        images = part.images.permute(0, 2, 3, 1).numpy()
        np.savez(path, x=images, y=np.asarray(part.targets), classes=np.asarray(part.classes))
        paths.append(path)
    return paths[0], paths[1]


def timed(command: list[str], env: dict, log) -> tuple[float, str]:
    """Run ``command``; ``(wall seconds, stdout)``; stderr goes to the log; a failure stops the benchmark."""
    log("$ " + " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[0]} {command[1]} failed with exit code {done.returncode}")
    return wall, done.stdout


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (the CLI prints one; the reference prints one, indented)."""
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(text.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument(
        "--engine-args", default="", help="extra fusion-engine train flags, e.g. '--extract-runtime torch'"
    )
    parser.add_argument("--work", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    _, train, test = held_out_split(args)
    weights_dir = os.environ.get("FUSION_ENGINE_WEIGHTS_DIR", str(SHARED / "weights"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "OPENBLAS_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "FUSION_ENGINE_WEIGHTS_DIR": weights_dir,
        "HF_HUB_OFFLINE": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_npz, test_npz = write_split(train, test, work)
        config = work / "engine.json"
        branches = [{"name": "timm", "weights": n, "input_size": args.input_size} for n in args.backbones]
        config.write_text(json.dumps({"backbones": branches}))
        log(f"{len(train)} train / {len(test)} held-out images; {args.threads} thread(s); backbones {args.backbones}")

        ref_wall, out = timed(
            [sys.executable, str(HERE / "reference_pipeline.py"), "--train", str(train_npz), "--test", str(test_npz),
             "--backbones", *args.backbones, "--weights-dir", weights_dir, "--input-size", str(args.input_size),
             "--threads", str(args.threads), "--seed", str(args.seed)],
            env,
            log,
        )  # fmt: skip
        ref = last_json(out)
        cache = work / f"cache-{time.time_ns()}"  # fresh: nothing extracted before
        engine_wall, out = timed(
            [sys.executable, "-m", "fusion_engine", "train", "--config", str(config), "--data", str(train_npz),
             "--data-test", str(test_npz), "--cache-dir", str(cache), "--no-baselines", "--seed", str(args.seed),
             "--out", str(work / "run"), "--json", "-q", *args.engine_args.split()],
            env,
            log,
        )  # fmt: skip
        eng = last_json(out)

    n_images, n_test = len(train) + len(test), len(test)
    phases = eng["timing"]["phases"]
    acc_ref, acc_eng = ref["held_out_accuracy"], eng["accuracy"]
    band = 2 * math.sqrt(acc_ref * (1 - acc_ref) / n_test + acc_eng * (1 - acc_eng) / n_test)
    diff = acc_eng - acc_ref
    rows = [
        ("decode + extract (train + held-out)", f"{ref['extract_seconds']:.1f}",
         f"{phases.get('extraction', 0):.1f} + {phases.get('evaluation', 0):.1f} (held-out, with scoring)"),
        ("fit", f"{ref['fit_seconds']:.1f}", f"{phases.get('head', 0):.1f}"),
        ("other (start-up, imports, setup, saving, report)",
         f"{ref_wall - ref['total_seconds']:.1f}",
         f"{engine_wall - phases.get('extraction', 0) - phases.get('evaluation', 0) - phases.get('head', 0):.1f}"),
        ("end to end (subprocess wall)", f"{ref_wall:.1f}", f"{engine_wall:.1f}"),
        ("images/s end to end", f"{n_images / ref_wall:.1f}", f"{n_images / engine_wall:.1f}"),
        ("held-out accuracy", f"{acc_ref:.4f}", f"{acc_eng:.4f}"),
    ]  # fmt: skip
    print(f"\n{args.dataset}: {len(train)} train / {n_test} held-out, {len(args.backbones)} backbones at "
          f"{args.input_size} px, {args.threads} thread(s), OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}\n")  # fmt: skip
    print("| phase | reference (s) | fusion-engine (s) |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nend to end: fusion-engine is {ref_wall / engine_wall:.2f}x the reference's speed; held-out accuracy "
        f"{100 * diff:+.2f} points (2-standard-error band of the difference ±{100 * band:.2f}: "
        + ("within noise" if abs(diff) <= band else "beyond noise")
        + f"); reference C = {ref['C']}"
    )
    summary = {
        "dataset": args.dataset,
        "n_train": len(train),
        "n_test": n_test,
        "threads": args.threads,
        "backbones": args.backbones,
        "input_size": args.input_size,
        "reference": {**ref, "wall_seconds": round(ref_wall, 2)},
        "engine": {"wall_seconds": round(engine_wall, 2), "phases": phases, "accuracy": acc_eng},
        "speedup": round(ref_wall / engine_wall, 3),
        "accuracy_difference": round(diff, 4),
        "two_se_band": round(band, 4),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
