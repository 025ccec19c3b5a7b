"""What the baselines cost next to the head they accompany, before and after the regularisation path.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/baselines.py --dataset cifar   # or usps

A frozen run on cached features: one pretrained backbone (``--weights``, from ../shared/weights, at
``--input-size`` px), a seeded stratified subset of ``--n-train`` training and ``--n-test`` held-out
images of the shared data, the training part split as ``fit()`` splits it (15% validation). The
features (branch and handcrafted) are extracted once through the feature cache, then timed on the
cached arrays:

- the head: ``train_head`` (concat, ``TrainConfig`` defaults: 40 epochs, early stopping);
- the baselines, old: today's method until this change, kept here for the comparison: for each probe
  (the branch and the handcrafted features) a cold scikit-learn fit for each C of 0.1, 1, 10 and a
  cold refit at the best C (float64, the BLAS's default threads);
- the baselines, new: ``fit_baselines`` (one warm-started path, C increasing, stopped once the
  validation accuracy no longer rises, the best solution kept without a refit; float32, one BLAS
  thread, lbfgs tolerance 1e-3);
- the same inside ``fit()``: a whole frozen run on the cached features, its ``phase_seconds``
  (``head``: head training and its validation score; ``baselines``), and the probes' held-out
  accuracy from ``evaluate``.

The head and the new baselines are timed ``--repeat`` times (median); the old method once.
Prints a markdown table: baseline seconds, head seconds, baselines / (head + baselines), and the
held-out accuracy of each probe; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from shared_data import DATASETS, SHARED

from fusion_engine import Engine
from fusion_engine.core.data import load_dataset, stratified_split
from fusion_engine.core.probes import Baselines, LinearProbe
from fusion_engine.training.baselines import fit_baselines, handcrafted_for
from fusion_engine.training.config import TrainConfig, seed_everything
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.fit import train_head

OLD_C_GRID = (0.1, 1.0, 10.0)


def old_fit_logistic(features, y, num_classes, C, seed=0, max_iter=300):
    """The probe fit before this change (core/probes.fit_logistic at 693384c), unchanged."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    xs = (x - mean) / scale
    present = np.unique(y)
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.full(num_classes, -1e4)
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(xs, y)
    coef[present], intercept[present] = model.coef_, model.intercept_
    f32 = np.float32
    return coef.astype(f32), intercept.astype(f32), mean.astype(f32), scale.astype(f32)


def old_fit_tuned(probe: LinearProbe, x, y, x_val, y_val, seed=0):
    """training/baselines.fit_tuned at 693384c: a cold fit per C, then a cold refit at the best C."""

    def fit(C):
        probe.set_solution(*old_fit_logistic(x, y, probe.num_classes, C, seed))

    best = None
    for C in OLD_C_GRID:
        fit(C)
        acc = float((probe.predict_proba(x_val).argmax(1) == np.asarray(y_val)).mean())
        if best is None or acc > best[0]:
            best = (acc, C)
    fit(best[1])
    return best[0], best[1]


def held_out(probe, x, y) -> float:
    return float((probe.predict_proba(x).argmax(1) == np.asarray(y)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cifar")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--weights", default="mobilenetv2_100.tf1_quant_in1k")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/fusion-engine/bench-features"))
    parser.add_argument("--threads", type=int, help="torch threads for the head (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="time the head and the new baselines N times (median)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("FUSION_ENGINE_WEIGHTS_DIR", str(SHARED / "weights"))

    data = load_dataset(SHARED / "data" / DATASETS[args.dataset])
    data, _ = stratified_split(data, len(data) - args.n_train - args.n_test, args.seed)
    train, test = stratified_split(data, args.n_test, args.seed)
    config = TrainConfig(seed=args.seed)
    fit_part, val = stratified_split(train, config.val_fraction, config.seed)  # as fit() splits
    engine = Engine.from_plugins()
    torch.manual_seed(args.seed)
    model = engine.build(
        {"backbones": [{"name": "timm", "weights": args.weights, "input_size": args.input_size}], "fusion": "concat"},
        class_names=data.classes,
    )
    cache = FeatureCache(args.cache_dir)
    start = time.perf_counter()
    feats, hand = {}, {}
    for name, part in (("fit", fit_part), ("val", val), ("test", test)):
        feats[name] = np.asarray(cache.features(model, part, progress=True)[0])
        hand[name] = np.asarray(handcrafted_for(part, cache, progress=True))
    y = {"fit": fit_part.targets, "val": val.targets, "test": test.targets}
    extract = time.perf_counter() - start
    load = os.getloadavg()
    print(
        f"{args.dataset}: {len(fit_part)} fit / {len(val)} validation / {len(test)} held-out; {args.weights} at "
        f"{args.input_size} px ({feats['fit'].shape[1]} features), handcrafted {hand['fit'].shape[1]}; "
        f"features ready in {extract:.1f} s; torch {torch.get_num_threads()} threads; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        file=sys.stderr,
    )

    def timed(run):
        """(median seconds over --repeat runs, the last run's result): the runs are deterministic."""
        seconds, result = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = run()
            seconds.append(time.perf_counter() - start)
        return float(np.median(seconds)), result

    def head_run():
        seed_everything(args.seed)
        head = engine.registry.get("fusion", "concat").factory([feats["fit"].shape[1]], len(data.classes))
        epochs = train_head(head, [feats["fit"]], y["fit"], [feats["val"]], y["val"], config, torch.device("cpu"))
        return head, epochs

    head_seconds, (head, epochs) = timed(head_run)
    head_acc = float((logits_from_features(head, [feats["test"]]).argmax(1) == y["test"]).mean())
    print(f"head: {head_seconds:.2f} s, {len(epochs)} epochs, held-out {head_acc:.4f}", file=sys.stderr)

    n_classes = len(data.classes)
    # new: fit_baselines, the regularisation path (first: the old method's BLAS threads may spin after it)
    baselines = Baselines([feats["fit"].shape[1]], n_classes)
    fit_args = ([feats["fit"]], y["fit"], [feats["val"]], y["val"], hand["fit"], hand["val"], args.seed)
    seconds, _ = timed(lambda: fit_baselines(baselines, *fit_args))
    path_branch = baselines.probes[0].fit_path(feats["fit"], y["fit"], feats["val"], y["val"])
    path_hand = baselines.handcrafted.fit_path(hand["fit"], y["fit"], hand["val"], y["val"])
    # old: a cold fit per C plus a cold refit, per probe (once: it is slow)
    import sklearn.linear_model  # noqa: F401  (imported before the clock starts, as the new method needs no import)

    probe, hand_probe = LinearProbe(feats["fit"].shape[1], n_classes), LinearProbe(hand["fit"].shape[1], n_classes)
    start = time.perf_counter()
    _, c_branch = old_fit_tuned(probe, feats["fit"], y["fit"], feats["val"], y["val"], args.seed)
    _, c_hand = old_fit_tuned(hand_probe, hand["fit"], y["fit"], hand["val"], y["val"], args.seed)
    old_seconds = time.perf_counter() - start

    # the same, as fit() runs and reports it: a frozen run on the cached features, its phase times
    spec = {"backbones": [{"name": "timm", "weights": args.weights, "input_size": args.input_size}], "fusion": "concat"}
    phases = []
    for _ in range(args.repeat):
        torch.manual_seed(args.seed)
        fitted = engine.build(spec, class_names=data.classes)
        history = fitted.fit(train, cache_dir=args.cache_dir, progress=False, log=lambda *a, **k: None, seed=args.seed)
        phases.append(history["phase_seconds"])
    report = fitted.evaluate(test, cache=cache, progress=False)

    rows = [
        # method, baselines s, head s, branch held-out, branch C, handcrafted held-out, handcrafted C
        (
            "old: cold fit per C + refit",
            old_seconds,
            head_seconds,
            held_out(probe, feats["test"], y["test"]),
            c_branch,
            held_out(hand_probe, hand["test"], y["test"]),
            c_hand,
        ),
        (
            "new: warm-started path",
            seconds,
            head_seconds,
            held_out(baselines.probes[0], feats["test"], y["test"]),
            path_branch.C,
            held_out(baselines.handcrafted, hand["test"], y["test"]),
            path_hand.C,
        ),
        (
            "new, inside fit() (its phase times)",
            float(np.median([p["baselines"] for p in phases])),
            float(np.median([p["head"] for p in phases])),
            next(iter(report["branches"].values())),
            path_branch.C,
            report["baselines"]["handcrafted"],
            path_hand.C,
        ),
    ]
    results = []
    print(
        "| method | baselines s | head s | baselines / (head + baselines) | branch probe held-out (C) "
        "| handcrafted held-out (C) |"
    )
    print("|---|---|---|---|---|---|")
    for label, seconds, head_s, branch_acc, c_branch, hand_acc, c_hand in rows:
        result = {
            "method": label,
            "baseline_seconds": round(seconds, 3),
            "head_seconds": round(head_s, 3),
            "ratio": round(seconds / (head_s + seconds), 4),
            "branch_held_out": branch_acc,
            "branch_C": c_branch,
            "handcrafted_held_out": hand_acc,
            "handcrafted_C": c_hand,
        }
        results.append(result)
        print(
            f"| {label} | {seconds:.2f} | {head_s:.2f} | {100 * result['ratio']:.1f}% "
            f"| {branch_acc:.4f} ({c_branch:g}) | {hand_acc:.4f} ({c_hand:g}) |"
        )
    print(
        f"head (concat) held-out: {head_acc:.4f} ({len(epochs)} epochs); validation accuracy along the paths: "
        f"branch {path_branch.scores}, handcrafted {path_hand.scores}"
    )
    end_load = os.getloadavg()
    print(f"load average at the end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}", file=sys.stderr)
    if args.json:
        summary = {
            "dataset": args.dataset,
            "n_fit": len(fit_part),
            "n_val": len(val),
            "n_test": len(test),
            "weights": args.weights,
            "input_size": args.input_size,
            "head_held_out": head_acc,
            "head_epochs": len(epochs),
            "repeat": args.repeat,
            "torch_threads": torch.get_num_threads(),
            "load_average": [load, end_load],
            "rows": results,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
