"""``fusion-engine train``: train a fused model, evaluate it beside its baselines on held-out data, save RUN_DIR."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.atomic import recover
from fusion_engine.cli.common import (
    apply_weights_dir,
    encryption_key,
    load_train_test,
    logger,
    report_summary,
    train_config_from,
    without_option,
)
from fusion_engine.cli.common import engine as make_engine
from fusion_engine.cli.search import add_search_options, run_search
from fusion_engine.core.config import load_config_file
from fusion_engine.core.defaults import build_default, default_config
from fusion_engine.core.input_size import sized_to_data
from fusion_engine.core.progress import PhaseClock, format_phases
from fusion_engine.errors import ConfigError
from fusion_engine.training.config import held_out_runtime
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.fit import fit
from fusion_engine.training.metrics import format_report
from fusion_engine.training.report import write_report_beside


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a fused model and evaluate it beside its baselines")
    p.add_argument("--config", help="fused-model config (.json or .yaml); default: a sensible fused model")
    p.add_argument(
        "--data",
        default="cifar10-sample",
        help="image folder, .npz file, 'digits', or 'cifar10-sample' (default: 2000 real photos that ship with "
        "fusion-engine, their 1000 held-out ones the test part)",
    )
    p.add_argument(
        "--data-test",
        help="held-out test data; default: the test part --data carries (cifar10-sample's, an .npz's x_test), "
        "else a stratified split of --data",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="held-out share when neither --data-test nor a test part"
    )
    p.add_argument("--val-fraction", type=float, help="validation share of the training data (early stopping)")
    p.add_argument("--out", default="runs/latest", help="RUN_DIR to write (replaced atomically)")
    p.add_argument("--mode", choices=["frozen", "finetune"], help="frozen (default): cached features; finetune")
    p.add_argument("--fusion", help="fusion name (overrides the config's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="head learning rate")
    p.add_argument("--backbone-lr", type=float, help="backbone learning rate (finetune)")
    p.add_argument("--unfreeze", type=int, help="finetune only the last N stages (default: all)")
    p.add_argument(
        "--train-blocks",
        type=int,
        help="frozen mode: also train the last K stages of every timm branch, on trunk activations cached once "
        "(default 0: the head only)",
    )
    p.add_argument(
        "--independent-branches",
        action="store_true",
        default=None,
        help="with --train-blocks: train each branch's top blocks and head on its own loss, each keeping its best "
        "epoch, and let the fusion combine them (a late-fusion ensemble; needs a head per branch: --fusion vote)",
    )
    p.add_argument(
        "--views",
        help="frozen mode: also train on the features of these image views, each extracted once (flip, shift), "
        "and/or flip-average at prediction (flip-average): e.g. flip,shift,flip-average; auto: what validation prefers; "
        "with --train-blocks, name them (flip,shift,flip-average): the tops train on the views' trunk activations "
        "too, and validation scores the flip-averaged features",
    )
    p.add_argument("--no-augment", action="store_true", help="finetune without data augmentation")
    p.add_argument("--mixup", type=float, help="finetune: mixup alpha")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="finetune in bfloat16 autocast (default fp32)")
    p.add_argument(
        "--extract-runtime",
        choices=["auto", "torch", "bf16", "onnx", "int8"],
        help="frozen-mode feature extraction: auto (default: onnx on the CPU, each branch checked against torch "
        "first; torch on GPUs), torch (channels_last on the CPU), bf16 autocast, onnx (onnxruntime), or int8 "
        "(onnxruntime, static int8, calibrated on 256 training images; opt-in)",
    )
    p.add_argument("--cutmix", type=float, help="finetune: cutmix alpha")
    p.add_argument("--resume", action="store_true", help="finetune: continue from RUN_DIR.checkpoint")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--nproc", type=int, default=1, help="run N local workers on torch.distributed (torchrun)")
    p.add_argument("--device", help="cpu, cuda, or auto (default)")
    p.add_argument("--weights-dir", action="append", help="folder with an index.json of local weights (repeatable)")
    p.add_argument("--cache-dir", help="feature cache folder (default: ~/.cache/fusion-engine/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--encrypt", action="store_true", help="store tensors encrypted (AES-256-GCM)")
    p.add_argument("--key-file", help="encryption key file (else FUSION_ENGINE_KEY)")
    p.add_argument("--sign-key", help="Ed25519 private key: sign the saved model")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the per-branch probes and the handcrafted baseline (evaluation then shows the fused model only)",
    )
    add_search_options(p)
    p.set_defaults(func=run)


def check_out(out: str, checkpoint: str | None = None) -> None:
    """ConfigError when --out (or the fine-tuning checkpoint folder beside it) cannot be written as a folder:
    a file, a symbolic link, or a file where a parent folder should be. Checked before any data is loaded."""
    path = Path(out)
    if path.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; RUN_DIR must be a folder (new or an earlier RUN_DIR)")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; RUN_DIR must be a folder (new or an earlier RUN_DIR)")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder; choose another RUN_DIR")
    if checkpoint and (Path(checkpoint).is_symlink() or (Path(checkpoint).exists() and not Path(checkpoint).is_dir())):
        raise ConfigError(
            f"{checkpoint}, where fine-tuning keeps its checkpoint beside --out, is not a folder; move it away "
            "or choose another --out"
        )


def run(args) -> int:
    """Train a fused model, evaluate it beside its baselines on held-out data, save RUN_DIR."""
    clock = PhaseClock()  # the end-of-run summary: every phase's wall time, adding up to the run's
    checkpoint = str(Path(args.out)) + ".checkpoint"  # beside RUN_DIR, never inside it (--out runs/x/)
    check_out(args.out, checkpoint if args.mode == "finetune" and not args.search else None)  # before any work
    if args.search:
        return run_search(args)
    if args.resume and args.mode != "finetune":
        raise ConfigError("--resume continues an interrupted --mode finetune run; add --mode finetune")
    if args.resume:  # fail before any work; a checkpoint save killed between its renames is put back first
        recover(checkpoint)
        if not os.path.isfile(os.path.join(checkpoint, "state.json")):
            raise ConfigError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    if args.nproc > 1 and not distributed.launched():
        return distributed.launch(args.nproc, without_option(args.argv, "--nproc"))
    distributed.init()
    worker = distributed.rank()
    apply_weights_dir(args)
    log = logger(args.json, silent=worker != 0)
    engine = make_engine()
    if args.config:
        config, note = load_config_file(args.config), f"config {args.config}"
    else:
        config, note = default_config(args.fusion or "concat", engine=engine)
    if args.fusion:
        config["fusion"] = args.fusion
    log(f"backbones: {note}")
    engine.validate(config)  # every component name and option, before any data is loaded
    clock.lap("setup")
    data, train_data, test_data = load_train_test(args, log)
    clock.lap("data")
    key = encryption_key(args, required=args.encrypt)
    train_config = train_config_from(args)
    torch.manual_seed(args.seed)  # random-init branches are reproducible too
    config = sized_to_data(config, train_data)  # small images are not blown up to 224 px for nothing
    if args.config:
        model = engine.build(config, class_names=data.classes)
    else:
        model = build_default(engine, config, data.classes, log)
    # the held-out features: with the training runtime when the backbones stay as they were (the same graphs)
    runtime = held_out_runtime(train_config)
    cache = FeatureCache(args.cache_dir, enabled=not args.no_cache, runtime=runtime, log=log)
    clock.lap("setup")
    if distributed.active() and train_config.mode == "frozen":  # the held-out features are sharded too
        cache.features(model, test_data, batch_size=train_config.batch_size, progress=not args.quiet)
        clock.lap("extraction")
    history = fit(
        model,
        train_data,
        config=train_config,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        progress=not args.quiet and worker == 0,
        log=log,
        checkpoint_dir=checkpoint,
        resume=args.resume,
        encryption_key=key,
    )
    charge_fit(clock, history)
    if worker != 0:
        return 0
    report = model.evaluate(
        test_data,
        cache=cache,
        device=train_config.device if train_config.device != "auto" else "cpu",
        progress=not args.quiet,
    )
    clock.lap("evaluation")
    model.metrics = {"test": report}
    out = model.save(args.out, encryption_key=key, signing_key=args.sign_key)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run finished: its checkpoint is spent
    clock.lap("saving")
    if not args.json:
        log(f"\nheld-out test results ({len(test_data)} images the model never saw):")
        log(format_report(report))
    write_report_beside(report, out, model=model, log=log)  # RUN_DIR.report.html: charts, mistakes, provenance
    clock.lap("report")
    timing = run_timing(clock)
    if args.json:
        print(
            json.dumps(
                {**report_summary(report), "run_dir": str(out), "history": history, "timing": timing}, default=str
            )
        )
    else:
        log(format_phases(timing["phases"], timing["seconds"], PHASE_LABELS))
        log(f"saved to {out}")
    return 0


# the phases of a run, in the order they happen; fit() measures the ones it runs
PHASE_LABELS = {
    "setup": "setup (plugins, config, model)",
    "data": "data loading",
    "finetune": "fine-tuning",
    "extraction": "feature extraction",
    "head": "head training",
    "baselines": "baselines (probes)",
    "evaluation": "evaluation (held-out)",
    "saving": "saving RUN_DIR",
    "report": "HTML report",
    "other": "other",
}


def charge_fit(clock: PhaseClock, history: dict) -> None:
    """Split the time fit() just took into its phases; what fit() did not assign stays in ``other``."""
    clock.lap(None)
    for name, seconds in history.get("phase_seconds", {}).items():
        if name != "other":
            clock.add(name, seconds)


def run_timing(clock: PhaseClock) -> dict:
    """``{"seconds": total, "phases": {name: seconds}}``: every phase of the run, in order, with ``other``
    (whatever no phase claimed), so that the phases add up to the total."""
    total = clock.total
    phases = clock.breakdown(total)
    order = [name for name in PHASE_LABELS if name in phases] + [name for name in phases if name not in PHASE_LABELS]
    return {"seconds": round(total, 3), "phases": {name: phases[name] for name in order}}
