"""Ed25519 manifest signatures: key generation, signing, and each way verification can fail."""

import base64
import json
import os
import shutil
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_engine.artifacts.signing import generate_keypair, sign_manifest, verify_manifest
from fusion_engine.errors import ArtifactError


def check(folder, public_key):
    """``verify_manifest`` over the manifest's bytes, read once as the store reads them."""
    return verify_manifest(folder, public_key, (folder / "manifest.json").read_bytes())


def make_artifact(folder, digest="ab" * 32):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": digest}}, indent=2))
    return folder


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "keys" / "signing.pem")


def test_keypair_files_and_permissions(keys):
    private, public = keys
    assert public.name == "signing.pem.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keypair_refuses_to_overwrite(keys):
    private, public = keys
    before = private.read_bytes()
    with pytest.raises(ArtifactError, match="already exists; choose another path or delete it"):
        generate_keypair(private)
    assert private.read_bytes() == before
    private.rename(private.with_name("moved.pem"))
    with pytest.raises(ArtifactError, match="signing.pem.pub already exists"):
        generate_keypair(private)  # the public half alone also blocks


def test_sign_and_verify(tmp_path, keys):
    private, public = keys
    folder = make_artifact(tmp_path / "art")
    fingerprint = sign_manifest(folder, private)
    record = json.loads((folder / "manifest.sig").read_text())
    assert record["algorithm"] == "ed25519" and record["public_key_fingerprint"] == fingerprint
    assert len(base64.b64decode(record["signature"])) == 64
    assert check(folder, public) == fingerprint


def test_verify_checks_the_bytes_it_is_given_never_the_file(tmp_path, keys):
    """The caller reads manifest.json once and parses what was verified: the file is not read again here."""
    private, public = keys
    folder = make_artifact(tmp_path / "art")
    signed_bytes = (folder / "manifest.json").read_bytes()
    fingerprint = sign_manifest(folder, private)
    (folder / "manifest.json").write_text('{"files": {}}')  # replaced on disk after the caller's read
    assert verify_manifest(folder, public, signed_bytes) == fingerprint
    (folder / "manifest.json").write_bytes(signed_bytes)  # the file is intact; the bytes given are not
    with pytest.raises(ArtifactError, match="manifest.json changed after signing"):
        verify_manifest(folder, public, signed_bytes.replace(b"ab", b"ff", 1))
    with pytest.raises(TypeError, match="needs the manifest's bytes"):
        verify_manifest(folder, public, str(folder / "manifest.json"))


def test_sign_signs_the_bytes_it_is_given(tmp_path, keys):
    private, public = keys
    folder = make_artifact(tmp_path / "art")
    checked = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").write_text('{"files": {"evil": "00"}}')  # swapped after the caller checked it
    sign_manifest(folder, private, checked)
    with pytest.raises(ArtifactError, match="manifest.json changed after signing"):
        check(folder, public)  # the swapped file was not signed
    (folder / "manifest.json").write_bytes(checked)
    check(folder, public)


def test_missing_signature(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match="artifact is not signed"):
        check(folder, keys[1])


def test_another_key(tmp_path, keys):
    other_private, other_public = generate_keypair(tmp_path / "other.pem")
    folder = make_artifact(tmp_path / "art")
    fingerprint = sign_manifest(folder, other_private)
    with pytest.raises(ArtifactError, match=f"signed by another key \\(fingerprint {fingerprint}\\), expected"):
        check(folder, keys[1])


def test_signature_copied_from_another_artifact(tmp_path, keys):
    first = make_artifact(tmp_path / "first", digest="ab" * 32)
    second = make_artifact(tmp_path / "second", digest="cd" * 32)
    sign_manifest(first, keys[0])
    shutil.copy(first / "manifest.sig", second / "manifest.sig")
    with pytest.raises(ArtifactError, match="changed after signing, or manifest.sig was copied from another artifact"):
        check(second, keys[1])


def test_manifest_edited_after_signing(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    sign_manifest(folder, keys[0])
    (folder / "manifest.json").write_text((folder / "manifest.json").read_text().replace("ab", "ff", 1))
    with pytest.raises(ArtifactError, match="manifest.json changed after signing"):
        check(folder, keys[1])


def test_edited_manifest_with_matching_recorded_hash_fails_signature(tmp_path, keys):
    import hashlib

    folder = make_artifact(tmp_path / "art")
    sign_manifest(folder, keys[0])
    (folder / "manifest.json").write_text("{}")
    record = json.loads((folder / "manifest.sig").read_text())
    record["manifest_sha256"] = hashlib.sha256(b"{}").hexdigest()
    (folder / "manifest.sig").write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="is invalid: not made by this key for this manifest"):
        check(folder, keys[1])


def test_tampered_signature_bytes(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    sign_manifest(folder, keys[0])
    record = json.loads((folder / "manifest.sig").read_text())
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 0x80
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    (folder / "manifest.sig").write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="manifest.sig is invalid"):
        check(folder, keys[1])


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b'{"algorithm": "rsa"}', b'{"algorithm": "ed25519", "signature": 5}']
)
def test_malformed_signature_file(tmp_path, keys, content):
    folder = make_artifact(tmp_path / "art")
    (folder / "manifest.sig").write_bytes(content)
    with pytest.raises(ArtifactError, match="signature file .* is malformed"):
        check(folder, keys[1])


def test_corrupt_and_missing_key_files(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    sign_manifest(folder, keys[0])
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ArtifactError, match="bad.pub is not a usable unencrypted PEM public key"):
        check(folder, bad)
    with pytest.raises(ArtifactError, match="cannot read public key"):
        check(folder, tmp_path / "nope.pub")
    with pytest.raises(ArtifactError, match="bad.pub is not a usable unencrypted PEM private key"):
        sign_manifest(folder, bad)


def test_wrong_key_type_is_named(tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = tmp_path / "rsa.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = tmp_path / "rsa.pub"
    public.write_bytes(
        rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    folder = make_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match="holds a .*RSAPrivateKey; fusion-engine signs only with Ed25519"):
        sign_manifest(folder, private)
    (folder / "manifest.sig").write_text("{}")
    with pytest.raises(ArtifactError, match="holds a .*RSAPublicKey"):
        check(folder, public)


def test_sign_without_manifest(tmp_path, keys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="cannot read .*manifest.json"):
        sign_manifest(tmp_path / "empty", keys[0])


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    private, public = generate_keypair(root / "k.pem")
    folder = make_artifact(root / "art")
    sign_manifest(folder, private)
    return folder, public, (folder / "manifest.sig").read_bytes()


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_signature_mutations_raise_artifact_error_only(signed, data):
    folder, public, original = signed
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1))
    mutated = bytearray(original)
    for index, value in edits:
        mutated[index] = value
    mutated = bytes(mutated[: data.draw(st.integers(0, len(mutated)))]) if data.draw(st.booleans()) else bytes(mutated)
    (folder / "manifest.sig").write_bytes(mutated)
    try:
        check(folder, public)
    except ArtifactError:
        return
    # it verified: the edit only touched JSON whitespace or non-canonical base64 bits, never the signed content
    assert base64.b64decode(json.loads(mutated)["signature"]) == base64.b64decode(json.loads(original)["signature"])
