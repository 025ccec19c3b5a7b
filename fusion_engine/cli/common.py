"""What several commands share: the engine, loading a RUN_DIR, the --data split, key options, logging."""

from __future__ import annotations

import os
import sys

from fusion_engine.api.engine import Engine, load
from fusion_engine.artifacts.encryption import load_key
from fusion_engine.core.data import load_dataset, own_test_source, stratified_split
from fusion_engine.core.weights_index import ENV_VAR
from fusion_engine.training.config import train_config
from fusion_engine.training.views import view_options


def engine() -> Engine:
    return Engine.from_plugins()


def logger(to_stderr: bool, silent: bool = False):
    """``print``, or a print to stderr when stdout carries one JSON object (``--json``); nothing when
    ``silent`` (the other ranks of a distributed run)."""
    if silent:
        return lambda *a, **k: None
    if to_stderr:
        return lambda *a, **k: print(*a, file=sys.stderr, **k)
    return print


def add_key_options(
    parser,
    *,
    public_key: str = "refuse RUN_DIR unless signed by this Ed25519 public key",
    key_file: str = "key of an encrypted RUN_DIR (else FUSION_ENGINE_KEY)",
) -> None:
    """``--public-key`` and ``--key-file``, as every command that reads a RUN_DIR takes them."""
    parser.add_argument("--public-key", help=public_key)
    parser.add_argument("--key-file", help=key_file)


def encryption_key(args, required: bool = False):
    """The key of ``--key-file`` (or FUSION_ENGINE_KEY when ``required``), else None."""
    if getattr(args, "key_file", None) or required:
        return load_key(args.key_file)
    return None


def load_run_dir(args):
    """The model at ``args.run_dir``, checked against ``--public-key`` and decrypted with ``--key-file``."""
    return load(args.run_dir, public_key=args.public_key, encryption_key=encryption_key(args))


def apply_weights_dir(args) -> None:
    if getattr(args, "weights_dir", None):
        os.environ[ENV_VAR] = os.pathsep.join(args.weights_dir)


def given(**flags) -> dict:
    """The flags a user set (not None); the ones left out keep the library's defaults."""
    return {name: value for name, value in flags.items() if value is not None}


def train_config_from(args):
    """The TrainConfig of ``fusion-engine train``'s flags (unset flags keep TrainConfig's defaults)."""
    return train_config(
        **given(
            mode=args.mode,
            epochs=args.epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            backbone_lr=args.backbone_lr,
            unfreeze=args.unfreeze,
            train_blocks=args.train_blocks,
            independent_branches=getattr(args, "independent_branches", None),
            augment=not args.no_augment,
            mixup=args.mixup,
            cutmix=args.cutmix,
            precision=args.precision,
            num_workers=args.workers,
            device=args.device,
            val_fraction=args.val_fraction,
            extract_runtime=args.extract_runtime,
            baselines=False if getattr(args, "no_baselines", False) else None,
            **view_options(args.views),
        )
    )


def load_train_test(args, log, training_note: str = "") -> tuple:
    """``--data`` and its held-out part: ``--data-test``, else the test part ``--data`` carries (a shipped
    sample's, an .npz's x_test/y_test), else a seeded stratified split of ``--data``."""
    data = load_dataset(args.data)
    own_test = own_test_source(args.data)
    if args.data_test:
        train_data, test_data = data, load_dataset(args.data_test)
    elif own_test is not None:
        train_data, test_data = data, load_dataset(own_test, split="test")
    else:
        train_data, test_data = stratified_split(data, args.test_fraction, args.seed)
    log(
        f"data: {data.name}: {len(train_data)} training images{training_note}, {len(test_data)} held-out test "
        f"images, {len(data.classes)} classes"
    )
    return data, train_data, test_data


def without_option(argv: list[str], option: str) -> list[str]:
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


def report_summary(report: dict) -> dict:
    """The parts of an evaluation report that ``--json`` prints."""
    keys = (
        "accuracy",
        "macro_f1",
        "n",
        "branches",
        "baselines",
        "margins",
        "margin_se",
        "per_class",
        "confusion_matrix",
    )
    return {k: report[k] for k in keys if k in report}
