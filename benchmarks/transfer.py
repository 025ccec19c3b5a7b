"""Held-out accuracy of every built-in fusion vs each backbone alone vs handcrafted features.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer.py --dataset cifar   # or usps

Data: ../shared/data (CIFAR-10 JPEG 8k split 6000/2000, USPS 7291 split 5291/2000),
stratified and seeded; branches: the MobileNetV2 weights in ../shared/weights, and (when the
fusion-engine-handcrafted plugin is installed) the same plus a HOG + colour-histogram branch.
Prints a markdown table (and --json) with margins, extraction and head-training times,
and the speed-up of a second run that hits the feature cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.training.feature_cache import FeatureCache

PRETRAINED = [
    "mobilenetv2_100.tf1_quant_in1k",
    "mobilenetv2_100.tf2_ptq_in1k",
    "mobilenetv2_100.tf1_quant_inat_bird",
    "mobilenetv2_100.tf1_quant_inat_insect",
]
FUSIONS = ["concat", "attention", "gated", "vote", "stacking"]


def branch(name: str) -> dict:
    return {"name": "timm", "weights": name, "label": name.split(".", 1)[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    data, train, test = held_out_split(args)
    print(
        f"{args.dataset}: {len(train)} train / {len(test)} held-out; device {args.device}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    engine = Engine.from_plugins()
    cache = FeatureCache(args.cache_dir)
    rows, timing = [], {}

    def run(label, config, baselines=False, record=True):
        torch.manual_seed(args.seed)
        model = engine.build(config, class_names=data.classes)
        start = time.perf_counter()
        history = model.fit(
            train,
            cache_dir=args.cache_dir,
            device=args.device,
            progress=False,
            log=lambda *a: None,
            seed=args.seed,
            baselines=baselines,
        )
        fit_seconds = time.perf_counter() - start
        report = model.evaluate(test, cache=cache, device=args.device, progress=False)
        if record:
            rows.append(
                {
                    "model": label,
                    "accuracy": report["accuracy"],
                    "macro_f1": report["macro_f1"],
                    "head_seconds": history["head_seconds"],
                    "extract_seconds": history["extract_seconds"],
                    "fit_seconds": round(fit_seconds, 2),
                }
            )
            print(f"{label}: {report['accuracy']:.4f} (fit {fit_seconds:.1f} s)", file=sys.stderr, flush=True)
        return report, history, fit_seconds

    fused = {"backbones": [branch(n) for n in PRETRAINED]}
    _, history, timing["first_fit_seconds"] = run("concat (all pretrained)", {**fused, "fusion": "concat"})
    timing["extract_seconds"] = history["extract_seconds"]
    timing["head_seconds"] = history["head_seconds"]
    _, _, timing["cached_fit_seconds"] = run("", {**fused, "fusion": "concat"}, record=False)
    report, _, _ = run("", {**fused, "fusion": "concat"}, baselines=True, record=False)
    singles = dict(report["branches"])
    for name, acc in singles.items():
        rows.append(
            {
                "model": f"{name} alone (linear probe)",
                "accuracy": acc,
                "macro_f1": report["branch_metrics"][name]["macro_f1"],
            }
        )
    rows.append(
        {
            "model": "handcrafted: HOG + colour histogram + logistic regression",
            "accuracy": report["baselines"]["handcrafted"],
            "macro_f1": report["baseline_metrics"]["handcrafted"]["macro_f1"],
        }
    )
    run(
        "random-init mobilenetv2_100 (concat head)",
        {"backbones": [{"name": "timm", "model": "mobilenetv2_100"}], "fusion": "concat"},
    )
    for fusion in FUSIONS[1:]:
        run(f"{fusion} (all pretrained)", {**fused, "fusion": fusion})
    if "handcrafted" in engine.registry.names("backbone"):  # deep and classic features fused, as the default model
        with_handcrafted = {"backbones": fused["backbones"] + [{"name": "handcrafted", "label": "handcrafted"}]}
        for fusion in ("concat", "stacking"):
            run(f"{fusion} (all pretrained + handcrafted branch)", {**with_handcrafted, "fusion": fusion})
    best_single = max(singles.values())
    best = max((r for r in rows if "(all pretrained" in r["model"]), key=lambda r: r["accuracy"])
    summary = {
        "dataset": args.dataset,
        "n_train": len(train),
        "n_test": len(test),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "timing": timing,
        "best_fusion": best["model"],
        "margin_vs_best_single": round(best["accuracy"] - best_single, 4),
        "margin_vs_handcrafted": round(best["accuracy"] - report["baselines"]["handcrafted"], 4),
        "cache_speedup": round(timing["first_fit_seconds"] / max(timing["cached_fit_seconds"], 1e-9), 1),
    }
    print("\n| model | held-out accuracy | macro-F1 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    print(
        f"\nbest fusion: {best['model']}: {100 * summary['margin_vs_best_single']:+.2f} points vs the best single "
        f"backbone, {100 * summary['margin_vs_handcrafted']:+.2f} vs handcrafted"
    )
    print(
        f"first fit {timing['first_fit_seconds']:.1f} s (extraction {timing['extract_seconds']} s, head "
        f"{timing['head_seconds']} s); the same fit again, hitting the feature cache: "
        f"{timing['cached_fit_seconds']:.1f} s ({summary['cache_speedup']}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
