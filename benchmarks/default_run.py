"""The README's main job as a new user runs it: ``fusion-engine train`` with no arguments, offline, fresh cache.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/default_run.py            # with and without fusion-engine-weights

Each run is its own process (``fusion-engine train --json``), with a fresh feature cache and
HF_HUB_OFFLINE=1; "without the weights package" hides the installed fusion-engine-weights with
FUSION_ENGINE_DISABLE_PLUGINS, as if it were not installed. Prints the wall time of each phase,
the held-out accuracy of the fused model, of each branch alone and of the handcrafted baseline, and the
process's wall time (Python start-up and imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = {"with fusion-engine-weights": {}, "without it": {"FUSION_ENGINE_DISABLE_PLUGINS": "fusion-engine-weights"}}


def train(env_extra: dict, extra_args: list[str]) -> dict:
    """One ``fusion-engine train --json`` in a fresh process and cache: its JSON plus the process wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **env_extra}
        command = [sys.executable, "-m", "fusion_engine", "train", "--json", "--cache-dir", f"{tmp}/cache"]
        start = time.perf_counter()
        done = subprocess.run(
            [*command, "--out", f"{tmp}/run", *extra_args], env=env, capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fusion-engine train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    notes = [line for line in done.stderr.splitlines() if "backbones:" in line or "left out" in line]
    return {**json.loads(done.stdout.splitlines()[-1]), "process_seconds": round(wall, 1), "notes": notes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write both runs here")
    parser.add_argument("args", nargs="*", help="extra arguments for fusion-engine train (after --)")
    args = parser.parse_args()
    import torch

    print(f"{torch.get_num_threads()} torch threads, HF_HUB_OFFLINE=1, fresh feature cache", file=sys.stderr)
    results = {}
    for label, env in RUNS.items():
        results[label] = result = train(env, args.args)
        print(f"{label}: fused {result['accuracy']:.4f} in {result['process_seconds']} s", file=sys.stderr)
    for label, result in results.items():
        print(f"\n### {label}\n")
        for note in result["notes"]:
            print(f"- {note.strip()}")
        print("\n| model | held-out accuracy |\n|---|---|")
        print(f"| **fused** | **{result['accuracy']:.4f}** |")
        for name, accuracy in result.get("branches", {}).items():
            print(f"| {name} alone (linear probe) | {accuracy:.4f} |")
        for name, accuracy in result.get("baselines", {}).items():
            print(f"| {name} baseline | {accuracy:.4f} |")
        margins = result.get("margins", {})
        if margins:
            print(
                f"\nfused vs best branch {100 * margins['vs_best_branch']:+.1f} points, vs handcrafted "
                f"{100 * margins['vs_handcrafted']:+.1f} points"
            )
        print("\n| phase | seconds |\n|---|---|")
        for phase, seconds in result["timing"]["phases"].items():
            print(f"| {phase} | {seconds:.1f} |")
        print(f"| **run (train's own clock)** | **{result['timing']['seconds']:.1f}** |")
        print(f"| process (start-up and imports too) | {result['process_seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
