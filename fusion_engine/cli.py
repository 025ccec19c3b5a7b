"""The ``fusion-engine`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import ConfigError, FusionEngineError


def _engine():
    from .engine import Engine

    return Engine.from_plugins()


def cmd_list(args) -> int:
    """Plugins, their components, and plugins that failed to load."""
    engine = _engine()
    components = engine.components(args.kind)
    if args.json:
        print(json.dumps({
            "plugins": [{"name": p.name, "version": p.version, "source": p.source, "distribution": p.distribution,
                         "components": [f"{c.kind}:{c.name}" for c in engine.components() if c.plugin == p.name]}
                        for p in engine.plugins],
            "components": [{"kind": c.kind, "name": c.name, "plugin": c.plugin, "version": c.version,
                            "description": c.description, "options": c.describe_options()} for c in components],
            "failures": [{"name": f.name, "version": f.version, "distribution": f.distribution, "error": f.error}
                         for f in engine.failures],
        }, indent=2))
        return 0
    print("Plugins:")
    for p in engine.plugins:
        offered = ", ".join(f"{c.kind}:{c.name}" for c in engine.components() if c.plugin == p.name)
        print(f"  {p.name} {p.version or '?'} ({p.source}{', ' + p.distribution if p.distribution else ''}): {offered}")
    for kind in ([args.kind] if args.kind else ["backbone", "extractor", "fusion"]):
        print(f"\n{kind.capitalize()}s:")
        for c in engine.components(kind):
            options = ", ".join(f"{k}: {v}" for k, v in c.describe_options().items())
            print(f"  {c.name:<14} {c.description}  [{c.plugin} {c.version or ''}]".rstrip())
            if args.verbose and options:
                print(f"  {'':<14} options: {options}")
    if engine.failures:
        print("\nPlugins that failed to load (set FUSION_ENGINE_STRICT_PLUGINS=1 to make this an error):")
        for f in engine.failures:
            print(f"  {f.name} {f.version or ''} ({f.distribution or 'unknown distribution'}): {f.error}")
    return 0


def _apply_weights_dir(args) -> None:
    if getattr(args, "weights_dir", None):
        from .weights_index import ENV_VAR

        os.environ[ENV_VAR] = os.pathsep.join(args.weights_dir)


def _encryption_key(args, required: bool = False):
    from .encryption import load_key

    if getattr(args, "key_file", None) or required:
        return load_key(args.key_file)
    return None


def cmd_train(args) -> int:
    """Train a fused model, evaluate it beside its baselines on held-out data, save RUN_DIR."""
    if getattr(args, "search", False):
        from .search import run_search

        return run_search(args)
    checkpoint = str(Path(args.out)) + ".checkpoint"  # beside RUN_DIR, never inside it (--out runs/x/)
    if args.resume and args.mode != "finetune":
        raise ConfigError("--resume continues an interrupted --mode finetune run; add --mode finetune")
    if args.resume and not os.path.isfile(os.path.join(checkpoint, "state.json")):  # fail before any work
        raise ConfigError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
    import torch

    from .config import load_config_file
    from .defaults import default_config
    from .features import FeatureCache
    from .metrics import format_report
    from .training import fit

    from . import distributed

    if args.nproc > 1 and not distributed.launched():
        return distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))
    distributed.init()
    worker = distributed.rank()
    _apply_weights_dir(args)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    if worker != 0:
        log = (lambda *a, **k: None)
    engine = _engine()
    if args.config:
        config, note = load_config_file(args.config), f"config {args.config}"
    else:
        config, note = default_config(args.fusion or "concat", engine=engine)
    if args.fusion:
        config["fusion"] = args.fusion
    log(f"backbones: {note}")
    data, train_data, test_data = load_train_test(args, log)
    encryption_key = _encryption_key(args, required=args.encrypt)
    train_config = train_config_from(args)
    torch.manual_seed(args.seed)  # random-init branches are reproducible too
    model = engine.build(config, class_names=data.classes)
    cache = FeatureCache(args.cache_dir, enabled=not args.no_cache)
    if distributed.active() and train_config.mode == "frozen":  # the held-out features are sharded too
        cache.features(model, test_data, batch_size=train_config.batch_size, progress=not args.quiet)
    history = fit(model, train_data, config=train_config, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                  progress=not args.quiet and worker == 0, log=log, checkpoint_dir=checkpoint,
                  resume=args.resume, encryption_key=encryption_key)
    if worker != 0:
        return 0
    report = model.evaluate(test_data, cache=cache, device=train_config.device if train_config.device != "auto" else "cpu",
                            progress=not args.quiet)
    model.extras["metrics"] = {"test": report}
    out = model.save(args.out, engine=engine, encryption_key=encryption_key, signing_key=args.sign_key)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run finished: its checkpoint is spent
    if args.json:
        print(json.dumps({**_summary(report), "run_dir": str(out), "history": history}, default=str))
    else:
        log(f"\nheld-out test results ({len(test_data)} images the model never saw):")
        log(format_report(report))
        log(f"extraction {history.get('extract_seconds', 0):.1f} s, head training {history.get('head_seconds', 0):.1f} s; "
            f"saved to {out}")
    return 0


def train_config_from(args):
    """The TrainConfig of ``fusion-engine train``'s flags (unset flags keep TrainConfig's defaults)."""
    from .training import TrainConfig

    overrides = {k: v for k, v in {
        "mode": args.mode, "epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
        "backbone_lr": args.backbone_lr, "unfreeze": args.unfreeze, "augment": not args.no_augment,
        "mixup": args.mixup, "cutmix": args.cutmix, "precision": args.precision, "num_workers": args.workers,
        "device": args.device, "val_fraction": args.val_fraction, "extract_runtime": args.extract_runtime}.items()
        if v is not None}
    return TrainConfig(**overrides)


def load_train_test(args, log, training_note: str = "") -> tuple:
    """``--data`` and its held-out part: ``--data-test``, else a seeded stratified split of ``--data``."""
    from .data import load_dataset, stratified_split

    data = load_dataset(args.data)
    if args.data_test:
        train_data, test_data = data, load_dataset(args.data_test)
    else:
        train_data, test_data = stratified_split(data, args.test_fraction, args.seed)
    log(f"data: {data.name}: {len(train_data)} training images{training_note}, {len(test_data)} held-out test "
        f"images, {len(data.classes)} classes")
    return data, train_data, test_data


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` minus ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _summary(report: dict) -> dict:
    keys = ("accuracy", "macro_f1", "n", "branches", "baselines", "margins", "per_class", "confusion_matrix")
    return {k: report[k] for k in keys if k in report}


def _load(args):
    from .artifacts import load

    key = _encryption_key(args)
    return load(args.run_dir, public_key=args.public_key, encryption_key=key)


def cmd_evaluate(args) -> int:
    """Held-out report of a saved model: fused, each branch, handcrafted baseline, per class."""
    from .features import FeatureCache
    from .metrics import format_report

    model = _load(args)
    report = model.evaluate(args.data, cache=FeatureCache(args.cache_dir, enabled=not args.no_cache),
                            progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(_summary(report)))
    else:
        print(format_report(report))
    plot = _confusion_png(report, model.class_names, args.confusion_png or f"{args.run_dir.rstrip('/')}.confusion.png")
    if plot and not args.json:
        print(f"confusion matrix: {plot}")
    return 0


def _confusion_png(report: dict, class_names, path):
    """Write the confusion matrix as an image when matplotlib is installed; return the path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 1 + 0.5 * len(class_names)))
    ax.imshow(report["confusion_matrix"], cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_predict(args) -> int:
    """Top-k classes and probabilities per image."""
    if args.runtime == "onnx":  # an exported .onnx file, or RUN_DIR exported in memory, run by onnxruntime
        from .export import predict_onnx_files as predictor
    else:
        from .prediction import predict_files as predictor
    model = args.run_dir if args.runtime == "onnx" and args.run_dir.endswith(".onnx") else _load(args)
    start = time.perf_counter()
    results = predictor(model, args.images, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"predicted {len(results)} images in {seconds:.2f} s ({len(results) / max(seconds, 1e-9):.1f} images/s)",
          file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(r["image"] + ": " + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["top"]))
    return 0


def cmd_keygen(args) -> int:
    from .signing import generate_keypair

    private, public = generate_keypair(args.out)
    print(f"private key: {private} (keep it secret)\npublic key: {public}")
    return 0


def cmd_sign(args) -> int:
    from .artifacts import verify
    from .signing import sign_manifest

    verify(args.run_dir)  # never sign an artifact whose files no longer match its manifest
    print(f"signed {args.run_dir} with key {sign_manifest(args.run_dir, args.key)}")
    return 0


def cmd_verify(args) -> int:
    from .artifacts import verify

    manifest = verify(args.run_dir, public_key=args.public_key)
    signed = "signature valid, " if args.public_key else ""
    print(f"{args.run_dir}: {signed}all {len(manifest.files)} file digests match the manifest")
    return 0


# Commands defined beside their feature: "module:function", the function adds its subparser to ``sub``.
EXTRA_COMMANDS: tuple[str, ...] = ("fusion_engine.bench:add_parser", "fusion_engine.compress:add_compress_parser",
                                   "fusion_engine.export:add_export_parser", "fusion_engine.scaffold:add_parser")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-engine", description="Fuse pretrained image backbones into one classifier.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="installed plugins and their components")
    p.add_argument("kind", nargs="?", choices=["backbone", "extractor", "fusion"], help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="show each component's options")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train a fused model and evaluate it beside its baselines")
    p.add_argument("--config", help="fused-model config (.json or .yaml); default: a sensible fused model")
    p.add_argument("--data", default="digits", help="image folder, .npz file, or 'digits' (default)")
    p.add_argument("--data-test", help="held-out test data; default: a stratified split of --data")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share when --data-test is absent")
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
    p.add_argument("--no-augment", action="store_true", help="finetune without data augmentation")
    p.add_argument("--mixup", type=float, help="finetune: mixup alpha")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="finetune in bfloat16 autocast (default fp32)")
    p.add_argument("--extract-runtime", choices=["torch", "bf16", "onnx"],
                   help="frozen-mode feature extraction: torch (default; channels_last on the CPU), bf16 autocast, or "
                        "onnx (onnxruntime, CPU: several times faster there; needs fusion-engine[onnx])")
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
    from .search import add_search_options

    add_search_options(p)
    p.set_defaults(func=cmd_train)

    for name, func, text in (("evaluate", cmd_evaluate, "held-out report of a saved model"),
                             ("predict", cmd_predict, "classify images with a saved model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("--public-key", help="refuse the model unless signed by this Ed25519 public key")
        p.add_argument("--key-file", help="decryption key file for an encrypted model (else FUSION_ENGINE_KEY)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        if name == "evaluate":
            p.add_argument("--data", required=True, help="image folder, .npz file or 'digits'")
            p.add_argument("--cache-dir")
            p.add_argument("--no-cache", action="store_true")
            p.add_argument("--confusion-png", help="where to write the confusion matrix (needs matplotlib)")
            p.add_argument("-q", "--quiet", action="store_true")
        else:
            p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
            p.add_argument("--top-k", type=int, default=3)
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--workers", type=int, default=0)
            p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                           help="onnx: run with onnxruntime; RUN_DIR may then be a .onnx file from `export`")

    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing models")
    p.add_argument("--out", required=True, help="private key path; the public key is written beside it (.pub)")
    p.set_defaults(func=cmd_keygen)
    p = sub.add_parser("sign", help="sign a saved model's manifest")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--key", required=True, help="Ed25519 private key file")
    p.set_defaults(func=cmd_sign)
    p = sub.add_parser("verify", help="check a saved model's digests (and signature)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--public-key", help="Ed25519 public key; the signature must verify")
    p.set_defaults(func=cmd_verify)
    for entry in EXTRA_COMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except FusionEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
