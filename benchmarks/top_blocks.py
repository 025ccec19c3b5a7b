"""Top-block fine-tuning on cached trunk activations: held-out accuracy and wall time for K = 0, 1, 2.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/top_blocks.py --limit 3000 --held-out 1000   # 2000/1000
    OMP_WAIT_POLICY=PASSIVE python benchmarks/top_blocks.py --rows 0,2,2:flip \
        --weights mobilenetv2_100.tf1_quant_in1k,mobilenetv2_100.tf2_ptq_in1k,mobilenetv1_075.tf1_quant_in1k \
        --input-size 160                                                                  # 6000/2000, 3 branches

The branches (--weights, from ../shared/weights) with a concat head, trained with ``train_blocks`` K (0: the frozen
features and a linear head, as today) and optionally views (``K:flip``: the trunk activations of mirrored images
too; ``+flip-average``: the model averages each image's features with its mirror image's; ``+independent``: a vote
fusion whose branches train apart, each top and head on its own loss, with the best branch alone beside it). Per row:
activation/feature extraction and training wall time (one cache folder for all rows, fresh unless --cache-dir: a
row's extraction is cold unless an earlier row extracted the same), validation and held-out accuracy (with
flip-average, also without it), and the trained model's inference speed next to the first row's, measured side by
side (alternating) on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from shared_data import DATASETS, SHARED

from fusion_engine import Engine
from fusion_engine.core.data import load_dataset, stratified_split
from fusion_engine.core.loader import make_loader
from fusion_engine.training.evaluation import evaluate, probe_logits
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.metrics import paired_difference_se
from fusion_engine.training.views import flip_averaged


@torch.inference_mode()
def held_out(model, test, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, images per second) of the full model on ``test``."""
    model.eval()
    predictions, start = [], time.perf_counter()
    for images, _ in make_loader(test, model, batch_size):
        predictions.append(model(images).argmax(1).numpy())
    seconds = time.perf_counter() - start
    return float((np.concatenate(predictions) == test.targets).mean()), len(test) / seconds


def fit_row(engine, backbones, classes, train, row: str, args, cache_dir, baselines: bool):
    """A model of ``backbones`` trained as ``row`` (K or K:token+token...: views, flip-average, independent)
    says: a concat head, or with ``independent`` a vote of branches trained apart; (model, history)."""
    k, _, named = row.partition(":")
    tokens = named.split("+") if named else []
    independent = "independent" in tokens
    views = [v for v in tokens if v not in ("flip-average", "independent")]
    torch.manual_seed(args.seed)
    model = engine.build({"backbones": backbones, "fusion": "vote" if independent else "concat"}, class_names=classes)
    history = model.fit(
        train,
        train_blocks=int(k),
        independent_branches=independent,
        feature_views=views,
        flip_average="flip-average" in tokens,
        epochs=args.epochs,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        seed=args.seed,
        cache_dir=cache_dir,
        baselines=baselines,
        progress=True,
        log=lambda *a, **kw: None,
    )
    return model, history


def branch_head_predictions(model, test, cache) -> dict[str, np.ndarray]:
    """Each branch head's own predictions on ``test`` (a vote of independently trained branches: each is that
    backbone trained alone), from the features ``evaluate`` cached."""
    features = cache.features(model, test, progress=False)
    if model.config.flip_average:
        features = flip_averaged(cache, model, test, features, progress=False)
    return {
        name: probe_logits(head, f).argmax(1)
        for name, head, f in zip(model.branch_names, model.fusion.branch_heads, features)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cifar")
    parser.add_argument("--limit", type=int, help="use only this many images (stratified), then hold out --held-out")
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="mobilenetv2_100.tf1_quant_in1k", help="one branch each, comma-separated")
    parser.add_argument("--input-size", type=int, help="every branch's input side (default: each model's own)")
    parser.add_argument(
        "--rows",
        default="0,1,2",
        help="K or K:view+view per row, comma-separated (2:flip; 2:flip+shift+flip-average also averages each "
        "image's features with its mirror image's at prediction; 2:flip+shift+flip-average+independent trains "
        "the branches apart and votes)",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="top blocks' learning rate")
    parser.add_argument("--speed-images", type=int, default=256, help="images per inference-speed measurement")
    parser.add_argument("--cache-dir", help="reuse this cache folder (default: a fresh one: extraction measured cold)")
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also score each branch's linear probe (on the features the row trained) and the handcrafted baseline",
    )
    parser.add_argument(
        "--single-rivals",
        action="store_true",
        help="also train each backbone alone the same way, and give the fused margin over the best of them",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("FUSION_ENGINE_WEIGHTS_DIR", str(SHARED / "weights"))
    data = load_dataset(SHARED / "data" / DATASETS[args.dataset])
    if args.limit:
        data, _ = stratified_split(data, len(data) - args.limit, args.seed)
    train, test = stratified_split(data, args.held_out, args.seed)
    print(
        f"{args.dataset}: {len(train)} train (15% of it validation) / {len(test)} held-out; {args.weights} at "
        f"{args.input_size or 'their own'} px; "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    engine = Engine.from_plugins()
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        size = {"input_size": [3, args.input_size, args.input_size]} if args.input_size else {}
        backbones = [{"name": "timm", "weights": w, **size} for w in args.weights.split(",")]
        for row in args.rows.split(","):
            start = time.perf_counter()
            model, history = fit_row(engine, backbones, data.classes, train, row, args, cache_dir, args.baselines)
            fit_seconds = time.perf_counter() - start
            held_out_cache = FeatureCache(os.path.join(tmp, f"held-out {len(rows)}"), runtime="torch")
            report = evaluate(model, test, cache=held_out_cache, progress=False)
            accuracy = report["accuracy"]
            models[row] = model
            rows.append(
                {
                    "row": row,
                    "held_out_accuracy": round(accuracy, 4),
                    "stderr": round((accuracy * (1 - accuracy) / len(test)) ** 0.5, 4),
                    "val_accuracy": round(history["val_accuracy"], 4),
                    "epochs": len(history["epochs"]),
                    "val_curve": [e["val_accuracy"] for e in history["epochs"]],
                    "extract_seconds": history["extract_seconds"],
                    "train_seconds": history["head_seconds"],
                    "fit_seconds": round(fit_seconds, 1),
                }
            )
            if model.config.flip_average:  # what the averaging adds: the same model predicting from one view
                model.config.flip_average = False  # its un-mirrored features are cached: only the head runs again
                unaveraged = evaluate(model, test, cache=held_out_cache, progress=False)["accuracy"]
                model.config.flip_average = True
                rows[-1]["held_out_without_flip_average"] = round(unaveraged, 4)
            if history["config"]["independent_branches"]:  # fused vs its best branch alone, on the same images
                alone = branch_head_predictions(model, test, held_out_cache)
                scores = {name: float((p == test.targets).mean()) for name, p in alone.items()}
                best = max(scores, key=scores.get)
                rows[-1]["branches_alone"] = {name: round(a, 4) for name, a in scores.items()}
                rows[-1]["vs_best_alone"] = round(accuracy - scores[best], 4)
                se = paired_difference_se(test.targets, report.predictions, alone[best])
                rows[-1]["two_se_vs_best_alone"] = round(2 * se, 4)
            if args.baselines:
                rows[-1]["branches"] = {k: round(v, 4) for k, v in report["branches"].items()}
                rows[-1]["handcrafted"] = round(report["baselines"]["handcrafted"], 4)
                for rival in ("best_branch", "handcrafted"):  # two standard errors paired on the same images
                    rows[-1][f"vs_{rival}"] = round(report["margins"][f"vs_{rival}"], 4)
                    rows[-1][f"two_se_vs_{rival}"] = round(2 * report["margin_se"][f"vs_{rival}"], 4)
            if args.single_rivals:  # each backbone alone, trained the same way: paired on the same images
                singles = {}
                for backbone in backbones:
                    alone, _ = fit_row(engine, [backbone], data.classes, train, row, args, cache_dir, False)
                    singles[backbone["weights"]] = evaluate(
                        alone, test, cache=FeatureCache(enabled=False), progress=False
                    )
                best = max(singles, key=lambda w: singles[w]["accuracy"])
                rows[-1]["singles"] = {w: round(r["accuracy"], 4) for w, r in singles.items()}
                rows[-1]["vs_best_single"] = round(accuracy - singles[best]["accuracy"], 4)
                se = paired_difference_se(test.targets, report.predictions, singles[best].predictions)
                rows[-1]["two_se_vs_best_single"] = round(2 * se, 4)
                # late fusion: the singles' class probabilities averaged, against the best of them
                averaged = np.mean([r.probabilities for r in singles.values()], axis=0).argmax(1)
                rows[-1]["singles_averaged"] = round(float((averaged == test.targets).mean()), 4)
                rows[-1]["singles_averaged_vs_best_single"] = round(
                    rows[-1]["singles_averaged"] - singles[best]["accuracy"], 4
                )
                se = paired_difference_se(test.targets, averaged, singles[best].predictions)
                rows[-1]["two_se_singles_averaged_vs_best_single"] = round(2 * se, 4)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sample = test.subset(list(range(min(args.speed_images, len(test)))))
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(2):  # alternating, so that load from other processes hits every model alike
        for k, model in models.items():
            speeds[k].append(held_out(model, sample)[1])
    base = max(speeds[rows[0]["row"]])
    for row in rows:
        row["images_per_second"] = round(max(speeds[row["row"]]), 1)
        row["speed_vs_first"] = round(max(speeds[row["row"]]) / base, 3)
    print(
        "| K:views | held-out acc (+-1 s.e.) | val acc | epochs | extraction s | training s | fit s | img/s | speed ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['row']} | {r['held_out_accuracy']:.4f} +- {r['stderr']:.4f} | {r['val_accuracy']:.4f} | {r['epochs']} "
            f"| {r['extract_seconds']:.1f} | {r['train_seconds']:.1f} | {r['fit_seconds']:.1f} "
            f"| {r['images_per_second']:.1f} | {r['speed_vs_first']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    if args.baselines:
        for r in rows:
            print(
                f"{r['row']}: best branch probe {max(r['branches'].values()):.4f} ({r['vs_best_branch']:+.4f}, "
                f"2 s.e. {r['two_se_vs_best_branch']:.4f}); handcrafted {r['handcrafted']:.4f} "
                f"({r['vs_handcrafted']:+.4f}, 2 s.e. {r['two_se_vs_handcrafted']:.4f})"
            )
    for r in rows:
        if "branches_alone" in r:
            print(
                f"{r['row']}: the vote of branches trained apart against its best branch alone "
                f"{max(r['branches_alone'].values()):.4f}: {r['vs_best_alone']:+.4f} (2 s.e. {r['two_se_vs_best_alone']:.4f})"
            )
        if "singles" in r:
            print(
                f"{r['row']}: best backbone alone, trained the same way {max(r['singles'].values()):.4f} "
                f"({r['vs_best_single']:+.4f}, 2 s.e. {r['two_se_vs_best_single']:.4f}); the singles' probabilities "
                f"averaged {r['singles_averaged']:.4f} ({r['singles_averaged_vs_best_single']:+.4f} vs the best, "
                f"2 s.e. {r['two_se_singles_averaged_vs_best_single']:.4f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
