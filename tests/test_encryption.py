"""AES-256-GCM at rest: round trips, key sources, and refusal of wrong keys and modified data."""

import base64
import os
import stat

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_engine.artifacts.encryption import (
    decrypt_bytes,
    decrypt_tensors,
    encrypt_bytes,
    encrypt_tensors,
    generate_key,
    is_encrypted,
    load_key,
)
from fusion_engine.errors import ArtifactError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AD = b"model.safetensors"


def test_round_trip_bytes():
    blob = encrypt_bytes(b"secret weights", KEY, associated_data=AD)
    assert is_encrypted(blob) and b"secret weights" not in blob
    assert decrypt_bytes(blob, KEY, associated_data=AD) == b"secret weights"
    assert encrypt_bytes(b"secret weights", KEY, associated_data=AD) != blob  # fresh nonce each time


def test_round_trip_tensors():
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5), "h": torch.ones(2, dtype=torch.float16)}
    loaded = decrypt_tensors(encrypt_tensors(tensors, KEY, "model.safetensors"), KEY, "model.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def test_wrong_key():
    blob = encrypt_bytes(b"x", KEY, associated_data=AD)
    with pytest.raises(ArtifactError, match="decryption failed: wrong key or the file was modified"):
        decrypt_bytes(blob, OTHER_KEY, associated_data=AD)


def test_file_name_is_bound():
    blob = encrypt_tensors({"w": torch.ones(1)}, KEY, "a.safetensors")
    with pytest.raises(ArtifactError, match="decryption failed"):
        decrypt_tensors(blob, KEY, "b.safetensors")


def test_tampered_ciphertext():
    blob = bytearray(encrypt_bytes(b"payload" * 10, KEY, associated_data=AD))
    blob[-20] ^= 1
    with pytest.raises(ArtifactError, match="decryption failed: wrong key or the file was modified"):
        decrypt_bytes(bytes(blob), KEY, associated_data=AD)


def test_unencrypted_truncated_and_future_files_are_recognised():
    with pytest.raises(ArtifactError, match="not an encrypted fusion-engine file"):
        decrypt_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", KEY, associated_data=AD)
    blob = encrypt_bytes(b"x", KEY, associated_data=AD)
    with pytest.raises(ArtifactError, match="truncated"):
        decrypt_bytes(blob[:20], KEY, associated_data=AD)
    with pytest.raises(ArtifactError, match="unsupported encryption format version 2"):
        decrypt_bytes(blob[:5] + b"\x02" + blob[6:], KEY, associated_data=AD)


def test_key_must_be_32_bytes():
    with pytest.raises(ArtifactError, match="exactly 32 bytes"):
        encrypt_bytes(b"x", b"short", associated_data=AD)


@pytest.mark.parametrize(
    "content",
    [KEY, KEY.hex().encode(), KEY.hex().upper().encode() + b"\n", base64.b64encode(KEY), base64.b64encode(KEY) + b"\n"],
    ids=["raw", "hex", "hex-upper-newline", "base64", "base64-newline"],
)
def test_key_file_formats(tmp_path, content, monkeypatch):
    monkeypatch.setenv("FUSION_ENGINE_KEY", OTHER_KEY.hex())  # a key file wins over the environment
    (tmp_path / "key").write_bytes(content)
    assert load_key(tmp_path / "key") == KEY


@pytest.mark.parametrize("value", [KEY.hex(), base64.b64encode(KEY).decode()], ids=["hex", "base64"])
def test_key_from_environment(monkeypatch, value):
    monkeypatch.setenv("FUSION_ENGINE_KEY", value)
    assert load_key() == KEY
    monkeypatch.setenv("MY_KEY", value)
    assert load_key(env_var="MY_KEY") == KEY


def test_missing_key(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSION_ENGINE_KEY", raising=False)
    with pytest.raises(ArtifactError, match="this artifact is encrypted: pass --key-file or set FUSION_ENGINE_KEY"):
        load_key()
    with pytest.raises(ArtifactError, match="cannot read key file"):
        load_key(tmp_path / "absent")


@pytest.mark.parametrize("content", [b"abcd", KEY.hex()[:-2].encode(), base64.b64encode(KEY[:16]), b"\xff" * 40])
def test_wrong_length_key(tmp_path, content, monkeypatch):
    (tmp_path / "key").write_bytes(content)
    with pytest.raises(ArtifactError, match="is not a 256-bit key"):
        load_key(tmp_path / "key")
    monkeypatch.setenv("FUSION_ENGINE_KEY", "00" * 16)
    with pytest.raises(ArtifactError, match=r"\$FUSION_ENGINE_KEY is not a 256-bit key"):
        load_key()


def test_generate_key(tmp_path):
    path = generate_key(tmp_path / "data.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = load_key(path)
    assert len(key) == 32 and key != load_key(generate_key(tmp_path / "second.key"))
    with pytest.raises(ArtifactError, match="already exists"):
        generate_key(path)


BLOB = encrypt_bytes(b"weights " * 20, KEY, associated_data=AD)


@settings(max_examples=300, deadline=2000)
@given(data=st.data())
def test_random_mutations_raise_artifact_error_only(data):
    mutated = bytearray(BLOB)
    for index, value in data.draw(st.lists(st.tuples(st.integers(0, len(BLOB) - 1), st.integers(0, 255)))):
        mutated[index] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(mutated))))
    mutated = bytes(mutated[:cut]) + data.draw(st.binary(max_size=8))
    if mutated == BLOB:
        return
    with pytest.raises(ArtifactError):
        decrypt_bytes(mutated, KEY, associated_data=AD)
