"""Saved models through artifacts.save/load and the CLI: every kind of tampering refused with its own
message, pickle payloads never run, random manifest and tensor mutations raise the project's own
errors, encryption at rest, atomic saving."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fusion_engine import Engine, load
from fusion_engine.artifacts.encryption import load_key
from fusion_engine.artifacts.manifest import read_manifest
from fusion_engine.artifacts.safe_files import parse_safetensors
from fusion_engine.artifacts.signing import generate_keypair, sign_manifest
from fusion_engine.artifacts.store import save, verify
from fusion_engine.cli.main import main
from fusion_engine.errors import ArtifactError, FusionEngineError, WeightsError

CONFIG = {"backbones": [{"name": "timm", "model": "test_resnet", "input_size": 32}], "fusion": "concat"}
CLASSES = ["zero", "one", "two"]


class TouchPayload:
    """Unpickling this creates ``marker``: it stands for whatever code a malicious file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def write_payload(path, marker) -> None:
    torch.save({"weight": torch.ones(2), "evil": TouchPayload(str(marker))}, path)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory, engine):
    """A saved untrained model (save/load need no training) and its outputs on ``images``."""
    torch.manual_seed(0)
    model = engine.build(CONFIG, class_names=CLASSES).eval()
    model.metrics = {"test": {"accuracy": 0.5}}
    folder = tmp_path_factory.mktemp("base") / "run"
    save(model, folder)
    return folder


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """200 real images (scikit-learn's digits, 20 per class) as an .npz: quick to train and evaluate on."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pick = np.concatenate([np.flatnonzero(d.target == c)[:20] for c in range(10)])
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    np.savez(path, x=np.round(d.images[pick] * (255 / 16)).astype(np.uint8), y=d.target[pick])
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(folder / "key")
    other_private, other_public = generate_keypair(folder / "other")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture
def run(tmp_path, base_artifact):
    """A fresh copy of the base artifact to tamper with."""
    folder = tmp_path / "run"
    shutil.copytree(base_artifact, folder)
    return folder


@pytest.fixture
def signed(run, keys):
    sign_manifest(run, keys["private"])
    return run


def edit_manifest(folder, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def rewrite_tensors(folder, change) -> None:
    """Change model.safetensors and record its new digest, as an attacker editing both would."""
    path = folder / "model.safetensors"
    tensors = dict(st_load(path.read_bytes()))
    data = change(tensors)
    path.write_bytes(data if isinstance(data, bytes) else st_save(tensors))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_manifest(folder, lambda m: m["files"].update({"model.safetensors": digest}))


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- round trip and manifest content ------------------------------------------------------------------


def test_round_trip_and_manifest_records_everything(base_artifact, engine, images):
    model = load(base_artifact, engine=engine)
    again = load(base_artifact, engine=engine)
    assert torch.equal(model(images), again(images))
    assert model.class_names == CLASSES
    manifest, _ = read_manifest(base_artifact)
    assert manifest.schema_version == 1
    assert set(manifest.files) == {"model.safetensors"}
    assert (
        manifest.files["model.safetensors"]
        == hashlib.sha256((base_artifact / "model.safetensors").read_bytes()).hexdigest()
    )
    assert manifest.config["backbones"][0]["options"]["model"] == "test_resnet"
    assert manifest.branches[0].data_config["input_size"] == [3, 32, 32]
    assert {(c.kind, c.name) for c in manifest.components} == {
        ("backbone", "timm"),
        ("extractor", "avg"),
        ("fusion", "concat"),
    }
    assert {c.plugin for c in manifest.components} == {"timm_backbones", "extractors", "fusions"}
    assert all(c.version for c in manifest.components)
    assert {"torch", "timm", "fusion_engine"} <= set(manifest.versions)
    assert manifest.metrics == {"test": {"accuracy": 0.5}}
    assert sorted(p.name for p in base_artifact.iterdir()) == ["manifest.json", "model.safetensors"]


def test_cli_verify_intact(capsys, base_artifact):
    code, out = cli(capsys, "verify", base_artifact)
    assert code == 0 and "all 1 file digests match" in out


# --- tampering: each kind refused with its own message, by load() and by `fusion-engine verify` --------


def flip_weight_byte(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data
    path.write_bytes(bytes(data))


def rename_file(folder):
    (folder / "model.safetensors").rename(folder / "weights.safetensors")


def add_file(folder):
    (folder / "evil.py").write_text("import os\n")


def traversal_name(folder):
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    edit_manifest(folder, lambda m: m["files"].update({"../model.safetensors": digest}))


def absolute_name(folder):
    edit_manifest(folder, lambda m: m["files"].update({"/etc/passwd": "0" * 64}))


def symlinked_weights(folder):
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)


def symlinked_extra(folder):
    (folder / "link").symlink_to(folder / "model.safetensors")


def drop_model_from_manifest(folder):
    edit_manifest(folder, lambda m: m.update(files={}))
    (folder / "model.safetensors").unlink()


def future_schema(folder):
    edit_manifest(folder, lambda m: m.update(schema_version=2))


TAMPERING = {
    "weight byte": (flip_weight_byte, "'model.safetensors' was modified: sha256 differs"),
    "renamed file": (rename_file, "listed file 'model.safetensors' is missing"),
    "added file": (add_file, "unexpected file 'evil.py'"),
    "path traversal": (traversal_name, "'../model.safetensors' in the manifest is not a plain relative path"),
    "absolute path": (absolute_name, "'/etc/passwd' in the manifest is not a plain relative path"),
    "symlinked weights": (symlinked_weights, "'model.safetensors' in the artifact is a symbolic link"),
    "added symlink": (symlinked_extra, "unexpected file 'link'"),
    "model not listed": (drop_model_from_manifest, "does not list model.safetensors"),
    "manifest schema": (future_schema, "not a valid fusion-engine manifest .schema 1.: field .schema_version."),
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_refused_with_its_own_message(run, engine, capsys, kind):
    tamper, message = TAMPERING[kind]
    tamper(run)
    with pytest.raises(ArtifactError, match=message):
        load(run, engine=engine)
    code, out = cli(capsys, "verify", run)
    assert code == 2 and out.startswith("error: ") and re.search(message, out)


def test_manifest_field_edit_after_signing(signed, engine, keys, capsys):
    edit_manifest(signed, lambda m: m.update(class_names=["cat", "dog", "bird"]))
    load(signed, engine=engine)  # unsigned use cannot tell: the digests still match
    with pytest.raises(ArtifactError, match="manifest.json changed after signing"):
        load(signed, engine=engine, public_key=keys["public"])
    code, out = cli(capsys, "verify", signed, "--public-key", keys["public"])
    assert code == 2 and "manifest.json changed after signing" in out


def test_signature_byte_edit(signed, engine, keys):
    path = signed / "manifest.sig"
    record = json.loads(path.read_text())
    sig = bytearray(base64.b64decode(record["signature"]))
    sig[0] ^= 0x01
    record["signature"] = base64.b64encode(bytes(sig)).decode()
    path.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="manifest.sig is invalid: not made by this key for this manifest"):
        load(signed, engine=engine, public_key=keys["public"])


def test_signature_by_another_key(run, engine, keys, capsys):
    sign_manifest(run, keys["other_private"])
    with pytest.raises(ArtifactError, match="signed by another key"):
        load(run, engine=engine, public_key=keys["public"])
    code, out = cli(capsys, "evaluate", run, "--data", "./no-data-needed", "--public-key", keys["public"])
    assert code == 2 and "signed by another key" in out


def test_signature_copied_from_another_artifact(signed, tmp_path, engine, keys):
    other = tmp_path / "other"
    model = engine.build(CONFIG, class_names=["x", "y"])
    save(model, other, signing_key=keys["private"])
    shutil.copy(other / "manifest.sig", signed / "manifest.sig")
    with pytest.raises(ArtifactError, match="manifest.sig was copied from another artifact"):
        load(signed, engine=engine, public_key=keys["public"])


def test_unsigned_artifact_refused_when_a_key_is_given(run, engine, keys):
    with pytest.raises(ArtifactError, match="artifact is not signed"):
        load(run, engine=engine, public_key=keys["public"])


def test_symlinked_signature_refused(signed, engine, keys):
    outside = signed.parent / "sig"
    (signed / "manifest.sig").rename(outside)
    (signed / "manifest.sig").symlink_to(outside)
    with pytest.raises(ArtifactError, match="'manifest.sig' in the artifact is a symbolic link"):
        load(signed, engine=engine, public_key=keys["public"])


def test_weight_edit_after_signing_fails_even_with_a_valid_signature(signed, engine, keys):
    flip_weight_byte(signed)
    with pytest.raises(ArtifactError, match="'model.safetensors' was modified"):
        load(signed, engine=engine, public_key=keys["public"])


def test_cli_keygen_sign_verify(tmp_path, run, capsys):
    code, out = cli(capsys, "keygen", "--out", tmp_path / "k")
    assert code == 0 and (tmp_path / "k.pub").is_file()
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert cli(capsys, "sign", run, "--key", tmp_path / "k")[0] == 0
    code, out = cli(capsys, "verify", run, "--public-key", tmp_path / "k.pub")
    assert code == 0 and "signature valid" in out
    add_file(run)
    code, out = cli(capsys, "sign", run, "--key", tmp_path / "k")  # never sign files that no longer match
    assert code == 2 and "unexpected file 'evil.py'" in out


# --- pickles: refused wherever fusion-engine takes a file, payload never runs ---------------------------


def test_pickle_as_input_weights(tmp_path, engine, capsys, small_digits):
    marker = tmp_path / "pwned"
    for name in ("evil.pt", "evil.bin"):
        write_payload(tmp_path / name, marker)
        with pytest.raises(WeightsError, match="refusing to unpickle .*it holds code"):
            engine.build(
                {"backbones": [{"name": "timm", "model": "test_resnet", "weights": str(tmp_path / name)}]},
                num_classes=2,
            )
    write_payload(tmp_path / "evil.safetensors", marker)  # a pickle disguised as safetensors
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        engine.build(
            {"backbones": [{"name": "timm", "model": "test_resnet", "weights": str(tmp_path / "evil.safetensors")}]},
            num_classes=2,
        )
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "backbones": [
                    {"name": "timm", "model": "test_resnet", "input_size": 32, "weights": str(tmp_path / "evil.pt")}
                ]
            }
        )
    )
    code, out = cli(capsys, "train", "--config", config, "--data", small_digits, "--out", tmp_path / "out", "-q")
    assert code == 2 and "refusing to unpickle" in out
    assert not marker.exists()


def test_pickle_as_artifact_file(run, engine):
    marker = run.parent / "pwned"
    write_payload(run / "model.safetensors", marker)  # digest updated: only the format can refuse it
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    edit_manifest(run, lambda m: m["files"].update({"model.safetensors": digest}))
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        load(run, engine=engine)
    assert not marker.exists()


def test_pickle_beside_an_artifact(run, engine):
    marker = run.parent / "pwned"
    write_payload(run / "model.pt", marker)
    with pytest.raises(ArtifactError, match="unexpected file 'model.pt'"):
        load(run, engine=engine)
    assert not marker.exists()


def test_pickle_as_finetune_checkpoint(tmp_path, engine):
    from fusion_engine.training.finetune import _load_checkpoint

    marker = tmp_path / "pwned"
    model = engine.build(CONFIG, class_names=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
    folder = tmp_path / "run.checkpoint"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"epoch": 1, "param_groups": [], "scheduler": {}}))
    for name in ("model.safetensors", "optimizer.safetensors", "best.safetensors"):
        write_payload(folder / name, marker)
    with pytest.raises(Exception) as info:
        _load_checkpoint(folder, model, optimizer, scheduler)
    assert (
        "safetensor" in type(info.value).__name__.lower()
        or "safetensors" in str(info.value).lower()
        or isinstance(info.value, FusionEngineError)
    )
    assert not marker.exists()


# --- malformed tensors: clear errors ---------------------------------------------------------------------


def _first_float(tensors):
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)


def _wrong_shape(t):
    k = _first_float(t)
    t[k] = torch.zeros(t[k].numel() + 1)


def _wrong_dtype(t):
    k = _first_float(t)
    t[k] = t[k].double()


def _nan(t):
    k = _first_float(t)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")


def _inf(t):
    k = _first_float(t)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("inf")


def _missing(t):
    t.pop(_first_float(t))


def _extra(t):
    t["smuggled.weight"] = torch.zeros(2)


def _truncated(t):
    return st_save(t)[:-100]


def _garbage(t):
    return b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'


MALFORMED = {
    "wrong shape": (_wrong_shape, ArtifactError, "does not match the manifest's config: tensors 1 of another shape"),
    "wrong dtype": (_wrong_dtype, ArtifactError, "of another shape or dtype .*torch.float64"),
    "NaN": (_nan, WeightsError, "contains NaN or Inf"),
    "Inf": (_inf, WeightsError, "contains NaN or Inf"),
    "missing tensor": (_missing, ArtifactError, r"1 missing \(e.g."),
    "unexpected tensor": (_extra, ArtifactError, r"1 unexpected \(e.g. smuggled.weight\)"),
    "truncated": (_truncated, WeightsError, "not a valid safetensors file"),
    "malformed header": (_garbage, WeightsError, "not a valid safetensors file"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_tensors(run, engine, kind):
    change, error, message = MALFORMED[kind]
    rewrite_tensors(run, change)
    verify(run)  # the digests match: the content itself must be refused
    with pytest.raises(error, match=message):
        load(run, engine=engine)


# --- atomic saving -----------------------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_artifact(run, engine, images, monkeypatch):
    before = load(run, engine=engine)(images)
    other = engine.build(CONFIG, class_names=CLASSES)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("fusion_engine.artifacts.store.sha256_file", crash)  # after the weights, before the manifest
    with pytest.raises(OSError, match="disk full"):
        save(other, run)
    monkeypatch.undo()
    assert torch.equal(load(run, engine=engine)(images), before)
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_save_leaves_the_previous_artifact(run, engine, images):
    before = load(run, engine=engine)(images)
    other = engine.build(CONFIG, class_names=CLASSES)
    pid = os.fork()
    if pid == 0:  # child: die abruptly in the middle of writing the new artifact
        import fusion_engine.artifacts.store as artifacts

        artifacts.sha256_file = lambda path: os._exit(9)
        try:
            save(other, run)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    verify(run)
    assert torch.equal(load(run, engine=engine)(images), before)
    leftovers = [p for p in run.parent.iterdir() if p.name != "run"]
    assert all(p.name.startswith(".run.") and p.name.endswith(".tmp") for p in leftovers)  # beside, never inside


# --- property-based: random mutations raise the project's own errors, never crash or hang -------------------

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_own_error(folder, engine):
    try:
        load(folder, engine=engine)
    except FusionEngineError:
        pass


# Manifest mutations (bytes and fields) are fuzzed in tests/test_manifest_security.py.


@FUZZ
@given(data=st.data())
def test_random_tensor_file_mutations(base_artifact, tmp_path_factory, engine, data):
    folder = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(base_artifact, folder)

    def mutate(_tensors):
        raw = bytearray((folder / "model.safetensors").read_bytes())
        header = int.from_bytes(raw[:8], "little") + 8
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, header + 64))  # mostly the header, where parsing happens
            raw[at] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del raw[data.draw(st.integers(0, len(raw))) :]
        return bytes(raw)

    rewrite_tensors(folder, mutate)
    _load_or_own_error(folder, engine)


def _image_files(npz, folder, count: int = 3) -> list:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    x = np.load(npz)["x"]
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}.png")
        Image.fromarray(x[i * 20]).save(paths[-1])
    return paths


# --- encryption at rest ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encrypted_run(tmp_path_factory, small_digits):
    """``fusion-engine train --encrypt --key-file`` on digits with a tiny backbone."""
    folder = tmp_path_factory.mktemp("enc")
    key = folder / "key"
    key.write_text(os.urandom(32).hex())
    config = folder / "config.json"
    config.write_text(json.dumps(CONFIG))
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(small_digits),
            "--epochs",
            "3",
            "--out",
            str(folder / "run"),
            "--encrypt",
            "--key-file",
            str(key),
            "--cache-dir",
            str(folder / "cache"),
            "-q",
        ]
    )
    assert code == 0
    return folder / "run", key


def test_encrypted_round_trip_and_no_plaintext_on_disk(encrypted_run, engine, tmp_path):
    run, key = encrypted_run
    assert read_manifest(run)[0].encrypted
    raw = (run / "model.safetensors").read_bytes()
    assert raw.startswith(b"FEENC")
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        parse_safetensors(raw, "model.safetensors")

    model = load(run, engine=engine, encryption_key=load_key(key))
    head = model.fusion.head[-1].weight.detach().numpy().tobytes()
    assert len(head) >= 64
    needle = head[:64]
    on_disk = [p for p in run.parent.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert on_disk == []  # no decrypted copy of the weights anywhere under the training folder
    # re-saving encrypted with the same key round-trips
    save(model, tmp_path / "again", encryption_key=load_key(key))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load(tmp_path / "again", engine=engine, encryption_key=load_key(key))(x), model(x))


def test_encrypted_cli_with_key_file_and_environment(encrypted_run, capsys, monkeypatch, small_digits):
    run, key = encrypted_run
    code, out = cli(capsys, "evaluate", run, "--data", small_digits, "--key-file", key, "--json", "--no-cache")
    assert code == 0 and "accuracy" in json.loads(out.strip().splitlines()[-1])
    monkeypatch.setenv("FUSION_ENGINE_KEY", key.read_text().strip())
    code, out = cli(capsys, "verify", run)
    assert code == 0  # digests are checked on the ciphertext: no key needed to verify
    code, out = cli(capsys, "predict", run, "--json", *_image_files(small_digits, run.parent / "images"))
    assert code == 0 and len(json.loads(next(line for line in out.splitlines() if line.startswith("[")))) == 3


def test_encrypted_wrong_key(encrypted_run, engine, tmp_path, capsys, small_digits):
    run, _ = encrypted_run
    wrong = tmp_path / "wrong"
    wrong.write_text(os.urandom(32).hex())
    code, out = cli(capsys, "evaluate", run, "--data", small_digits, "--key-file", wrong)
    assert code == 2 and "decryption failed: wrong key or the file was modified" in out
    with pytest.raises(ArtifactError, match="decryption failed: wrong key"):
        load(run, engine=engine, encryption_key=os.urandom(32))


def test_encrypted_missing_key(encrypted_run, engine, capsys, monkeypatch):
    run, _ = encrypted_run
    monkeypatch.delenv("FUSION_ENGINE_KEY", raising=False)
    with pytest.raises(ArtifactError, match="this artifact is encrypted: pass --key-file or set FUSION_ENGINE_KEY"):
        load(run, engine=engine)
    code, out = cli(capsys, "predict", run, str(run / "manifest.json"))
    assert code == 2 and "this artifact is encrypted" in out


def test_train_encrypt_without_key_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FUSION_ENGINE_KEY", raising=False)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    code, out = cli(
        capsys, "train", "--config", config, "--data", "digits", "--out", tmp_path / "run", "--encrypt", "-q"
    )
    assert code == 2 and "pass --key-file or set FUSION_ENGINE_KEY" in out
    assert not (tmp_path / "run").exists()


def test_no_unpickling_anywhere_on_the_load_path(base_artifact, engine, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load(base_artifact, engine=engine)


def test_one_home_for_loading(base_artifact, engine, images):
    """``Engine.load`` rebuilds with that engine's plugins; ``fusion_engine.load`` is the same with a fresh
    engine; both return the FusedClassifier that ``Engine.build`` makes (fit, evaluate, save)."""
    from fusion_engine import FusedClassifier
    from fusion_engine import load as load_run_dir

    by_engine, by_function = engine.load(base_artifact), load_run_dir(base_artifact)
    assert isinstance(by_engine, FusedClassifier) and isinstance(by_function, FusedClassifier)
    assert torch.equal(by_engine(images), by_function(images))
    assert by_engine.manifest.files == read_manifest(base_artifact)[0].files
    assert by_engine.components == engine.build(CONFIG, class_names=CLASSES).components
