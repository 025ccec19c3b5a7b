"""Ed25519 signatures over an artifact's manifest.json, kept beside it in manifest.sig."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fusion_engine.artifacts.atomic import atomic_write_text
from fusion_engine.artifacts.manifest import MANIFEST_FILE, SIGNATURE_FILE
from fusion_engine.artifacts.safe_files import create_private_file
from fusion_engine.errors import ArtifactError

DOMAIN = b"fusion-engine-manifest-v1\n"  # a signature made for anything else never verifies here


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(private_path) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) and its public key beside it as ``<name>.pub``."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ArtifactError(f"{path} already exists; choose another path or delete it first")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    create_private_file(private_path, pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def _load_key(path, kind: str, expected_type):
    """Load a PEM key of ``expected_type``; every failure is an ArtifactError naming the file."""
    try:
        data = Path(path).read_bytes()
        if kind == "private":
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except OSError as e:
        raise ArtifactError(f"cannot read {kind} key {path}: {e}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ArtifactError(f"{path} is not a usable unencrypted PEM {kind} key: {e}") from None
    if not isinstance(key, expected_type):
        raise ArtifactError(f"{path} holds a {type(key).__name__}; fusion-engine signs only with Ed25519 keys")
    return key


def _read_manifest(folder: Path) -> bytes:
    try:
        return (folder / MANIFEST_FILE).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {folder / MANIFEST_FILE}: {e}") from None


def sign_manifest(folder, private_key_path, manifest: bytes | None = None) -> str:
    """Sign ``folder/manifest.json`` into ``folder/manifest.sig``; return the key's fingerprint.

    ``manifest``: the manifest's bytes as the caller wrote or checked them; they are what gets signed
    (without it the file is read once here, and whatever it holds then is signed).
    """
    key = _load_key(private_key_path, "private", Ed25519PrivateKey)
    if manifest is None:
        manifest = _read_manifest(Path(folder))
    record = {
        "algorithm": "ed25519",
        "public_key_fingerprint": fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(DOMAIN + manifest)).decode("ascii"),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    atomic_write_text(Path(folder) / SIGNATURE_FILE, json.dumps(record, indent=2) + "\n")
    return record["public_key_fingerprint"]


def _read_signature(path: Path) -> tuple[str, bytes, str]:
    """(fingerprint, signature, manifest sha256) from a signature file, or an ArtifactError."""
    try:
        record = json.loads(path.read_bytes())
        fields = [record["public_key_fingerprint"], record["signature"], record["manifest_sha256"]]
        if record["algorithm"] != "ed25519" or not all(isinstance(f, str) for f in fields):
            raise ValueError("unexpected algorithm or field type")
        fields[1] = base64.b64decode(fields[1], validate=True)
    except FileNotFoundError:
        raise ArtifactError(f"artifact is not signed: {path} is missing") from None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise ArtifactError(f"signature file {path} is malformed: {type(e).__name__}: {e}") from None
    return fields[0], fields[1], fields[2]


def verify_manifest(folder, public_key_path, manifest: bytes) -> str:
    """Check ``folder/manifest.sig`` against ``manifest`` and a public key; return the key's fingerprint.

    ``manifest`` is the bytes of ``folder/manifest.json`` that the caller read once and will parse: the
    file is never read here, so replacing it after the check cannot get an edited manifest trusted.
    """
    if not isinstance(manifest, bytes):
        raise TypeError("verify_manifest needs the manifest's bytes as read by the caller (read_manifest_bytes)")
    folder = Path(folder)
    key = _load_key(public_key_path, "public", Ed25519PublicKey)
    expected = fingerprint(key)
    signed_by, signature, manifest_sha256 = _read_signature(folder / SIGNATURE_FILE)
    if signed_by != expected:
        raise ArtifactError(f"artifact is signed by another key (fingerprint {signed_by}), expected {expected}")
    if hashlib.sha256(manifest).hexdigest() != manifest_sha256:
        raise ArtifactError(
            f"{MANIFEST_FILE} changed after signing, or {SIGNATURE_FILE} was copied from another artifact"
        )
    try:
        key.verify(signature, DOMAIN + manifest)
    except InvalidSignature:
        raise ArtifactError(f"{folder / SIGNATURE_FILE} is invalid: not made by this key for this manifest") from None
    return expected
