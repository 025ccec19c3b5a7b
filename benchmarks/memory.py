"""Peak resident memory of frozen-mode training as the number of images grows (MNIST 10k vs 60k).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory.py

Each run is `fusion-engine train` in its own process (fresh feature cache, one random-init
MobileNetV2 branch at 32 px, concat head, probes and handcrafted baseline included); its
peak RSS is read with getrusage(RUSAGE_CHILDREN) by a wrapper that starts nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from shared_data import SHARED

WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
)
CONFIG = {"backbones": [{"name": "timm", "model": "mobilenetv2_100", "input_size": 32}], "fusion": "concat"}


def peak_rss_mb(n: int, work: Path, threads: int) -> float:
    d = np.load(SHARED / "data" / "mnist.npz")
    data = work / f"mnist{n}.npz"
    np.savez(data, x=d["x_train"][:n], y=d["y_train"][:n])
    config = work / "config.json"
    config.write_text(json.dumps(CONFIG))
    cmd = [
        sys.executable,
        "-m",
        "fusion_engine",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--cache-dir",
        str(work / f"cache{n}"),
        "--out",
        str(work / f"run{n}"),
        "--epochs",
        "3",
        "--batch-size",
        "256",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True, check=True)
    kb, code = out.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"training failed for n={n}:\n{out.stderr[-2000:]}")
    return int(kb) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 60000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {n: peak_rss_mb(n, Path(tmp), args.threads) for n in args.sizes}
    print("| images | peak RSS (MB) |\n|---|---|")
    for n, mb in peaks.items():
        print(f"| {n} | {mb:.0f} |")
    first, last = args.sizes[0], args.sizes[-1]
    print(f"\nratio {last} / {first}: {peaks[last] / peaks[first]:.3f} (target < 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
