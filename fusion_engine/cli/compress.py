"""``fusion-engine compress``: fp16 storage, int8 linear layers, structured pruning with recovery."""

from __future__ import annotations

import json

from fusion_engine.api.engine import load
from fusion_engine.artifacts.compression import METHODS, accuracy, compress, folder_bytes
from fusion_engine.artifacts.manifest import read_manifest
from fusion_engine.artifacts.store import save
from fusion_engine.cli.common import add_key_options, encryption_key, logger
from fusion_engine.core.data import load_dataset, stratified_split
from fusion_engine.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="fp16 storage, int8 linear layers, structured channel pruning")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="RUN_DIR to write the compressed model to")
    p.add_argument(
        "--method",
        action="append",
        required=True,
        help=f"one of {', '.join(METHODS)}; repeat or comma-separate to combine (applied prune -> int8 -> fp16)",
    )
    p.add_argument("--ratio", type=float, default=0.3, help="prune: share of each prunable layer's channels removed")
    p.add_argument("--round-to", type=int, help="prune: keep channel counts multiples of this")
    p.add_argument(
        "--data",
        help="training data for prune's recovery fine-tune; with it, held-out accuracy "
        "before/after is reported (same split as train: --test-fraction, --seed)",
    )
    p.add_argument("--data-test", help="held-out data; then all of --data is used for the fine-tune")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1, help="prune: recovery fine-tune epochs")
    p.add_argument("--lr", type=float, default=3e-4, help="prune: recovery learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-recovery", action="store_true", help="prune without the recovery fine-tune")
    add_key_options(
        p, key_file="key of an encrypted RUN_DIR (else FUSION_ENGINE_KEY); the output is encrypted with it too"
    )
    p.add_argument("--encrypt", action="store_true", help="encrypt the output even if RUN_DIR is not encrypted")
    p.add_argument("--sign-key", help="Ed25519 private key: sign the compressed model")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    """``fusion-engine compress RUN_DIR --out DIR --method ...``"""
    log = logger(args.json)
    # --key-file decrypts an encrypted RUN_DIR; for a plaintext one it only encrypts the output (--encrypt)
    source_encrypted = read_manifest(args.run_dir)[0].encrypted
    source = load(
        args.run_dir, public_key=args.public_key, encryption_key=encryption_key(args) if source_encrypted else None
    )
    encrypted = source.manifest.encrypted or args.encrypt
    key = encryption_key(args, required=True) if encrypted else None
    methods = [m.strip() for chunk in args.method for m in chunk.split(",") if m.strip()]
    train = test = None
    if args.data:
        data = load_dataset(args.data)
        if args.data_test:
            train, test = data, load_dataset(args.data_test)
        else:
            train, test = stratified_split(data, args.test_fraction, args.seed)
    elif "prune" in methods and not args.no_recovery:
        raise ConfigError("prune needs --data for its recovery fine-tune (or --no-recovery to skip it)")
    acc_before = accuracy(source, test) if test is not None else None
    step_list = compress(
        source,
        methods,
        train=None if args.no_recovery else train,
        ratio=args.ratio,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        round_to=args.round_to,
        log=log,
        progress=not args.quiet and not args.json,
    )
    result = {"methods": [s["method"] for s in step_list]}
    for s in step_list:
        if s["method"] == "prune":
            result.update({k: s["info"][k] for k in ("macs_before", "macs_after", "params_before", "params_after")})
    if test is not None:
        result.update(held_out=len(test), accuracy_before=acc_before, accuracy_after=accuracy(source, test))
    # the source's test metrics describe the uncompressed model: kept, but under their own name
    metrics = {"compression": {"source": str(args.run_dir), **result}, "source_metrics": source.metrics}
    out = save(source, args.out, encryption_key=key, signing_key=args.sign_key, metrics=metrics)
    result = {
        "run_dir": str(out),
        **result,
        "bytes_before": folder_bytes(args.run_dir),
        "bytes_after": folder_bytes(out),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            log(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0
