"""Automatic selection (``fusion-engine train --search``) vs the best fixed configuration.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/search.py --dataset cifar --cache-dir /work/cache/bench \\
        --fixed /work/bench/cifar.json --json /work/bench/search-cifar.json          # or --dataset usps
    # the winner's final training as train's flags set it, e.g.
    #   --train-blocks 2 --independent-branches --views flip,shift,flip-average --epochs 25 --no-recompute

Data and split exactly as benchmarks/transfer.py (CIFAR-10 JPEG 8k: 6000/2000, USPS: 5291/2000,
stratified, seed 0), so a cache that transfer.py filled is reused: the candidates are every
MobileNet in ../shared/weights, each as ``{"name": "timm", "weights": NAME}`` (transfer.py's
options; the label is not part of the cache key), plus the handcrafted (HOG + colour histogram)
backbone when its plugin is installed. Weights the engine cannot build are listed.

Prints the leaderboard (CV on the training split only; held-out scored after the choice),
the searched model's held-out accuracy, and the comparison with the best fixed configuration:
from transfer.py's --json results when given (--fixed), and recomputed here (every built-in
fusion on all buildable MobileNetV2s, trained as fit() trains them, same held-out split).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.cli.common import given
from fusion_engine.core.weights_index import all_entries
from fusion_engine.search.run import search
from fusion_engine.training.config import train_config as validated_train_config
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.views import view_options

FIXED_FUSIONS = ["concat", "attention", "gated", "vote", "stacking"]


def mobilenets() -> list[dict]:
    """Every MobileNet of the weights index, labelled as transfer.py labels them."""
    out = []
    for name in all_entries():
        if name.startswith("mobilenet"):
            label = name.split(".", 1)[1] if name.startswith("mobilenetv2_100.") else name
            out.append({"name": "timm", "weights": name, "label": label})
    return out


def best_fixed_from(path: Path) -> dict | None:
    """The best row of transfer.py's results (fused or single, random-init excluded)."""
    if not path or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if "random-init" not in r["model"]]
    best = max(rows, key=lambda r: r["accuracy"])
    return {
        "source": str(path),
        "model": best["model"],
        "accuracy": best["accuracy"],
        "n_test": data["n_test"],
        "rows": {r["model"]: r["accuracy"] for r in rows},
    }


def noise(p: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies near ``p`` on ``n`` images."""
    return 2 * math.sqrt(2 * p * (1 - p) / max(n, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--time-budget", type=float, default=30.0, help="minutes for the selection")
    parser.add_argument("--max-branches", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fixed", type=Path, help="transfer.py's --json results for this dataset")
    parser.add_argument("--no-recompute", action="store_true", help="skip recomputing the fixed configurations")
    parser.add_argument("--out", help="RUN_DIR for the searched model (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--train-blocks", type=int, help="train the winner's last K stages (train --train-blocks)")
    parser.add_argument("--independent-branches", action="store_true", help="as train --independent-branches")
    parser.add_argument("--views", help="as train --views (e.g. flip,shift,flip-average)")
    parser.add_argument("--epochs", type=int, help="the final training's epochs (default: TrainConfig's)")
    args = parser.parse_args()
    data, train, test = held_out_split(args)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(
        f"{args.dataset}: {len(train)} train / {len(test)} held-out; device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    engine = Engine.from_plugins()
    train_config = validated_train_config(
        seed=args.seed,
        device=args.device,
        **given(train_blocks=args.train_blocks, epochs=args.epochs),
        independent_branches=args.independent_branches,
        **view_options(args.views),
    )
    start = time.perf_counter()
    candidates = mobilenets()
    if "handcrafted" in engine.registry.names("backbone"):  # as fusion-engine train --search adds it
        candidates.append({"name": "handcrafted", "label": "handcrafted"})
    result = search(
        train,
        candidates,
        test=test,
        engine=engine,
        train_config=train_config,
        cache_dir=args.cache_dir,
        log=log,
        time_budget=args.time_budget,
        max_branches=args.max_branches,
        folds=args.folds,
    )
    search_wall = time.perf_counter() - start
    fit_start = time.perf_counter()
    model, history = result.fit(train, cache_dir=args.cache_dir, log=log)
    report = model.evaluate(test, cache=FeatureCache(args.cache_dir), device=args.device, progress=False)
    result.final = {
        "held_out_accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "seconds": round(time.perf_counter() - fit_start, 2),
    }
    out = args.out or str(Path(args.cache_dir).parent / f"search-{args.dataset}-run")
    searched = report["accuracy"]

    fixed = {"transfer": best_fixed_from(args.fixed)}
    if not args.no_recompute:  # the transfer.py configurations, trained as fit() trains them, on the same split
        v2 = [c.label for c in result.candidates if c.spec.get("weights", "").startswith("mobilenetv2_100.")]
        t = time.perf_counter()
        rows = {f"{f} (all pretrained)": result.score_fixed(v2, f) for f in FIXED_FUSIONS}
        if any(c.label == "handcrafted" for c in result.candidates):
            rows.update(
                {
                    f"{f} (all pretrained + handcrafted branch)": result.score_fixed(v2 + ["handcrafted"], f)
                    for f in ("concat", "stacking")
                }
            )
        rows.update(
            {
                f"{b} alone (concat head)": r["held_out"]
                for r in result.rows
                if r["kind"] == "single" and r["fusion"] == {"name": "concat"}
                for b in r["backbones"]
                if r["held_out"] is not None
            }
        )
        best = max(rows, key=rows.get)
        fixed["recomputed"] = {
            "model": best,
            "accuracy": rows[best],
            "rows": rows,
            "seconds": round(time.perf_counter() - t, 1),
        }
    summary = {
        "dataset": args.dataset,
        "n_train": len(train),
        "n_test": len(test),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "limit": args.limit,
        "train_config": train_config.model_dump(),
        "searched_held_out": searched,
        "winner": result.winner["candidate"],
        "winner_config": result.winner_config,
        "search": result.to_dict(),
        "fixed": fixed,
        "search_wall_seconds": round(search_wall, 1),
        "run_dir": out,
    }
    print(f"\n{result.table()}\n\n{result.summary()}")
    print(
        f"\nsearched model ({result.winner['candidate']}, trained on all {len(train)} training images): "
        f"held-out accuracy {searched:.4f}"
    )
    for kind, best in fixed.items():
        if best:
            diff = searched - best["accuracy"]
            band = noise(best["accuracy"], len(test))
            verdict = "at least as good within noise" if diff >= -band else "WORSE beyond noise"
            best["margin"], best["noise"], best["verdict"] = round(diff, 4), round(band, 4), verdict
            print(
                f"best fixed configuration ({kind}): {best['model']} {best['accuracy']:.4f}; searched "
                f"{100 * diff:+.2f} points (held-out noise ±{100 * band:.2f}): {verdict}"
            )
    t = result.timing
    print(
        f"extraction {t['extract_seconds']:.1f} s ({t['cached_backbones']} of {len(result.candidates)} backbones "
        f"from the cache); selection {t['search_seconds']:.1f} s (budget {t['budget_seconds']:.0f} s); baseline "
        f"{t['baseline_seconds']} s; held-out report {t.get('report_seconds', 0):.1f} s; final training "
        f"{result.final['seconds']} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    try:  # last: the numbers above are kept even if saving fails
        result.save(model, out)
        print(f"saved the searched model to {out} (config: {out}.config.json)")
    except Exception as exc:  # noqa: BLE001
        print(f"saving {out} failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
