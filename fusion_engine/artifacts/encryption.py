"""AES-256-GCM encryption of artifact files at rest; plaintext only ever lives in memory."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import save as save_safetensors_bytes

from fusion_engine.artifacts.safe_files import create_private_file, parse_safetensors
from fusion_engine.errors import ArtifactError, WeightsError

MAGIC = b"FEENC"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
ENV_VAR = "FUSION_ENGINE_KEY"


def generate_key(path) -> Path:
    """Write a new random 256-bit key, hex-encoded, to a new file with mode 0600."""
    return create_private_file(path, os.urandom(KEY_SIZE).hex().encode("ascii") + b"\n")


def _parse_key(text: bytes, source: str) -> bytes:
    """A 32-byte key from 64 hex characters or base64 of 32 bytes."""
    text = text.strip()
    try:
        key = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else base64.b64decode(text, validate=True)
    except ValueError:  # also bad ASCII and bad base64
        key = b""
    if len(key) != KEY_SIZE:
        raise ArtifactError(
            f"key from {source} is not a 256-bit key: expected 32 raw bytes, 64 hex characters or base64 of 32 bytes"
        )
    return key


def load_key(key_file=None, env_var: str = ENV_VAR) -> bytes:
    """The 32-byte key from ``key_file`` (raw, hex or base64) or, without one, from the environment variable."""
    if key_file is not None:
        try:
            data = Path(key_file).read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read key file {key_file}: {e}") from None
        return data if len(data) == KEY_SIZE else _parse_key(data, f"key file {key_file}")
    value = os.environ.get(env_var)
    if not value:
        raise ArtifactError(f"this artifact is encrypted: pass --key-file or set {env_var}")
    return _parse_key(value.encode("utf-8"), f"${env_var}")


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` starts like a file written by :func:`encrypt_bytes`."""
    return data.startswith(MAGIC)


def _cipher(key: bytes) -> AESGCM:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise ArtifactError("encryption key must be exactly 32 bytes (AES-256)")
    return AESGCM(key)


def encrypt_bytes(data: bytes, key: bytes, *, associated_data: bytes) -> bytes:
    """``HEADER + nonce + ciphertext``; ``associated_data`` (e.g. the file name) must match on decryption."""
    nonce = os.urandom(NONCE_SIZE)
    return HEADER + nonce + _cipher(key).encrypt(nonce, data, HEADER + associated_data)


def decrypt_bytes(blob: bytes, key: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt_bytes`; any wrong key, changed byte or other file name is an ArtifactError."""
    cipher = _cipher(key)
    if not is_encrypted(blob):
        raise ArtifactError("not an encrypted fusion-engine file (no encryption header)")
    if len(blob) < len(HEADER) + NONCE_SIZE + TAG_SIZE:
        raise ArtifactError("encrypted file is truncated")
    if blob[: len(HEADER)] != HEADER:
        raise ArtifactError(f"unsupported encryption format version {blob[len(MAGIC)]}; upgrade fusion-engine")
    nonce = blob[len(HEADER) : len(HEADER) + NONCE_SIZE]
    try:
        return cipher.decrypt(nonce, blob[len(HEADER) + NONCE_SIZE :], HEADER + associated_data)
    except InvalidTag:
        raise ArtifactError("decryption failed: wrong key or the file was modified") from None


def encrypt_tensors(tensors: dict[str, torch.Tensor], key: bytes, name: str) -> bytes:
    """Serialise ``tensors`` as safetensors in memory and encrypt them, bound to the file ``name``."""
    return encrypt_bytes(save_safetensors_bytes(tensors), key, associated_data=name.encode("utf-8"))


def decrypt_tensors(blob: bytes, key: bytes, name: str) -> dict[str, torch.Tensor]:
    """Decrypt and parse tensors written by :func:`encrypt_tensors`, without touching the disk."""
    data = decrypt_bytes(blob, key, associated_data=name.encode("utf-8"))
    try:
        return parse_safetensors(data, f"decrypted {name!r}")
    except WeightsError as e:  # authentic but not tensors: the artifact, not a weights file, is at fault
        raise ArtifactError(str(e)) from None
