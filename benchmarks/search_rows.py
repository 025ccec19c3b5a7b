"""What one cross-validated leaderboard row of ``train --search`` costs on cached features.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/search_rows.py --limit 2667 --cache-dir /work/cache/search-cifar
    OMP_WAIT_POLICY=PASSIVE python benchmarks/search_rows.py --limit 2667 --cache-dir /work/cache/search-cifar \\
        --impl old=/tmp/old_search/search_old   # the same rows with another copy of fusion_engine.search

(a copy: an older fusion_engine/search, from ``git show REV:fusion_engine/search/FILE.py``, with its
``fusion_engine.search.`` imports renamed ``search_old.``; run both at once to compare them under the same load)

The four MobileNetV2 candidates of ../shared/weights are extracted once (CIFAR-10, the seeded split of
shared_data.py; ``--limit 2667`` keeps about 2000 training images) and kept as a plain .npz under
--cache-dir, so the timing does not depend on the feature cache's key. Then the selection runs as
``train --search`` runs it (every default fusion, 5-fold CV, up to 3 backbones), every row is refitted on
the training split and scored on the held-out part, and the script prints rows per minute, seconds per
row by fusion, and the agreement of the CV order with the held-out order (Kendall tau and Spearman rho
over every scored row, and the search's own check over its top rows).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from shared_data import add_split_arguments, held_out_split

from fusion_engine import Engine
from fusion_engine.core.data import stratified_split
from fusion_engine.training.config import TrainConfig
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache

CANDIDATES = [
    "mobilenetv2_100.tf1_quant_in1k",
    "mobilenetv2_100.tf2_ptq_in1k",
    "mobilenetv2_100.tf1_quant_inat_bird",
    "mobilenetv2_100.tf1_quant_inat_insect",
]


def features(args, engine, train_config: TrainConfig) -> dict:
    """Train features in fit()'s split order (fit part, then early-stopping part), held-out features, labels."""
    path = Path(args.cache_dir) / f"search-rows-{args.dataset}-{args.limit or 'all'}-{len(args.candidates)}.npz"
    if path.is_file():
        data = np.load(path)
        return {k: data[k] for k in data.files}
    from fusion_engine.search.candidates import extract_candidates

    _, train, test = held_out_split(args)
    parts = list(stratified_split(train, train_config.val_fraction, train_config.seed))
    cache = FeatureCache(args.cache_dir)  # onnx where it agrees with torch
    specs = [{"name": "timm", "weights": name} for name in args.candidates]
    start = time.perf_counter()
    cands, skipped = extract_candidates(
        engine, specs, parts + [test], train.classes, cache, batch_size=64, device="cpu", throughput_images=8
    )
    if skipped:
        raise SystemExit(f"cannot extract: {skipped}")
    n_train = sum(len(p) for p in parts)
    out = {
        "y": np.concatenate([np.asarray(p.targets) for p in parts]),
        "y_test": np.asarray(test.targets),
        "n_fit": np.asarray(len(parts[0])),
        "labels": np.asarray([c.label for c in cands]),
        "rates": np.asarray([c.images_per_second for c in cands]),
        "classes": np.asarray(train.classes),
    }
    for i, c in enumerate(cands):
        out[f"train{i}"], out[f"test{i}"] = c.features[:n_train], c.features[n_train:]
    print(f"extracted {len(cands)} candidates in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(parser)
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--impl", default="new", help="NAME or NAME=DIR: a copy of fusion_engine/search to time")
    parser.add_argument("--time-budget", type=float, default=15.0, help="minutes for the selection")
    parser.add_argument("--max-branches", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--race-margin", type=float, help="SearchConfig.race_margin (an --impl that has it)")
    parser.add_argument("--threads", type=int, help="torch threads (1 for two implementations side by side)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_plugins()
    train_config = TrainConfig(seed=args.seed, device="cpu")
    data = features(args, engine, train_config)
    if args.extract_only:
        return 0
    name, _, folder = args.impl.partition("=")
    package = "fusion_engine.search"
    if folder:  # a copy of the package whose imports were rewritten to its folder name
        sys.path.insert(0, str(Path(folder).parent))
        package = Path(folder).name
    selection = importlib.import_module(f"{package}.selection")
    candidates = importlib.import_module(f"{package}.candidates")
    config_module = importlib.import_module(f"{package}.config")

    cands = [
        candidates.Candidate(
            label=str(label),
            spec={"name": "timm", "weights": str(label)},
            dim=data[f"train{i}"].shape[1],
            parameters=0,
            images_per_second=float(data["rates"][i]),
            extract_seconds=0.0,
            cached=True,
            features=data[f"train{i}"],
        )
        for i, label in enumerate(data["labels"])
    ]
    y, y_test, n_fit = data["y"], data["y_test"], int(data["n_fit"])
    fusions = [
        {"name": n, **o}
        for c in engine.components("fusion")
        for n in [c.name]
        for o in candidates.DEFAULT_GRID.get(n, [{}])
    ]
    race = {} if args.race_margin is None else {"race_margin": args.race_margin}
    config = config_module.SearchConfig(
        time_budget=args.time_budget, max_branches=args.max_branches, folds=args.folds, **race
    )
    searcher = selection.Searcher(
        engine, cands, y, n_fit, len(data["classes"]), config, train_config, torch.device("cpu"), lambda *a: None
    )
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    log(
        f"{name}: {len(y)} training rows, {len(y_test)} held-out, {len(cands)} candidates, {len(fusions)} fusion "
        f"settings, {len(searcher.folds)} folds; {torch.get_num_threads()} threads"
    )
    searcher.log = log
    outcome = searcher.run(fusions, dict(candidates.SCREEN_FUSION))
    seconds = searcher.clock.elapsed
    rows = [r for r in searcher.rows.values() if r["cv_mean"] is not None]
    sizes = {k: sum(len(r["subset"]) == k for r in rows) for k in (1, 2, 3)}

    # held-out: every scored row refitted on the training split as the report refits it
    start = time.perf_counter()
    fit_idx, stop_idx = np.arange(n_fit), np.arange(n_fit, len(y))
    for row in rows:
        feats = [cands[i].features for i in row["subset"]]
        head = searcher.fit_head(row["fusion"], feats, fit_idx, stop_idx, train_config)
        tests = [data[f"test{i}"] for i in row["subset"]]
        logits = logits_from_features(head, tests)
        row["held_out"] = float((logits.argmax(1) == y_test).mean())
    held_seconds = time.perf_counter() - start
    board = sorted(rows, key=lambda r: (-r["cv_mean"], r["parameters"]))
    from scipy.stats import kendalltau, spearmanr

    cv = [r["cv_mean"] for r in board]
    held = [r["held_out"] for r in board]
    check = selection.rank_agreement(board, len(y_test))
    summary = {
        "impl": name,
        "threads": torch.get_num_threads(),
        "n_train": len(y),
        "n_test": len(y_test),
        "rows": len(rows),
        "rows_by_size": sizes,
        "not_scored": [r["candidate"] for r in searcher.rows.values() if r["cv_mean"] is None],
        "selection_seconds": round(seconds, 1),
        "rows_per_minute": round(60 * len(rows) / max(seconds, 1e-9), 2),
        "seconds_per_row": {r["candidate"]: r["seconds"] for r in rows},
        "stopped": outcome["stopped"],
        "winner": outcome["winner"]["candidate"],
        "winner_held_out": outcome["winner"]["held_out"],
        "best_held_out": max(held),
        "kendall_tau": round(float(kendalltau(cv, held).statistic), 4),
        "spearman_rho": round(float(spearmanr(cv, held).statistic), 4),
        "top_check": check["statement"],
        "held_out_refit_seconds": round(held_seconds, 1),
    }
    print("| rank | row | CV | held-out | seconds |\n|---|---|---|---|---|")
    for k, r in enumerate(board, 1):
        print(f"| {k} | {r['candidate']} | {r['cv_mean']:.4f} | {r['held_out']:.4f} | {r['seconds']:.1f} |")
    print(json.dumps({k: v for k, v in summary.items() if k != "seconds_per_row"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
