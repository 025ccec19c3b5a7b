"""``fusion-engine keygen``, ``sign`` and ``verify``: Ed25519 signatures over a RUN_DIR's manifest."""

from __future__ import annotations

from fusion_engine.artifacts.signing import generate_keypair
from fusion_engine.artifacts.store import sign, verify


def add_parser(sub) -> None:
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


def cmd_keygen(args) -> int:
    private, public = generate_keypair(args.out)
    print(f"private key: {private} (keep it secret)\npublic key: {public}")
    return 0


def cmd_sign(args) -> int:
    print(f"signed {args.run_dir} with key {sign(args.run_dir, args.key)}")  # files checked against what is signed
    return 0


def cmd_verify(args) -> int:
    manifest = verify(args.run_dir, public_key=args.public_key)
    signed = "signature valid, " if args.public_key else ""
    print(f"{args.run_dir}: {signed}all {len(manifest.files)} file digests match the manifest")
    return 0
