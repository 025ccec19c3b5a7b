"""ONNX export of the whole fused model (preprocessing included), its parity check, and predict --runtime onnx.

Tolerances: probabilities within 1e-4 (max abs difference) of torch's on real images; on the held-out
digits (360 images) onnxruntime's top-1 equals torch's on every image but at most one.

Signed files: ``export --sign-key`` writes FILE.onnx.sig; ``predict FILE.onnx --runtime onnx --public-key``
runs only the bytes that verified, and refuses a flipped byte, a missing or borrowed .sig, a forged digest
and another key, each with an ArtifactError (exit 2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization

from fusion_engine import Engine, load
from fusion_engine.artifacts.signing import generate_keypair
from fusion_engine.artifacts.store import save
from fusion_engine.cli.main import main
from fusion_engine.errors import ArtifactError, ExportError

MISSING = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"ONNX export needs {', '.join(MISSING)} (pip install 'fusion-engine[onnx]')"
)


# Two input sizes: the 24px branch is resized inside the graph (bilinear, antialiased).
CONFIG = {
    "backbones": [
        {"name": "timm", "model": "test_resnet", "input_size": 32},
        {"name": "timm", "model": "test_efficientnet", "input_size": 24},
    ],
    "fusion": {"name": "attention", "dim": 32, "heads": 2},
}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private, public) Ed25519 key files."""
    return generate_keypair(tmp_path_factory.mktemp("keys") / "signing.pem")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, engine, digits_split, train_and_save, keys):
    """A tiny two-branch model trained on digits, saved, and exported (and signed) with ``fusion-engine export``."""
    folder = tmp_path_factory.mktemp("export")
    train_and_save(engine, CONFIG, digits_split[0], folder / "run", epochs=8, lr=3e-3)
    out = folder / "model.onnx"
    code = main(["export", str(folder / "run"), "--format", "onnx", "--out", str(out), "--sign-key", str(keys[0])])
    assert code == 0
    return folder / "run", out


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_export_metadata_and_dynamic_batch(exported, engine):
    run, onnx_file = exported
    model = load(run, engine=engine)
    s = session(onnx_file)
    meta = {k: json.loads(v) for k, v in s.get_modelmeta().custom_metadata_map.items()}
    assert meta["fusion_engine.class_names"] == model.class_names
    assert meta["fusion_engine.input"]["shape"] == ["batch", 3, 32, 32]
    assert meta["fusion_engine.input"]["range"] == [0.0, 1.0]
    assert [o.name for o in s.get_outputs()] == ["logits", "probabilities"]
    for batch in (1, 7):
        x = torch.rand(batch, 3, 32, 32)
        logits, probs = s.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            expected = torch.softmax(model(x), 1).numpy()
        assert probs.shape == (batch, 10) and logits.shape == (batch, 10)
        assert np.abs(probs - expected).max() <= 1e-4


def test_onnx_top1_matches_torch_on_held_out_digits(exported, engine, digits_split):
    from fusion_engine.runtime.export import check_images, input_contract, parity

    run, onnx_file = exported
    _, test = digits_split
    model = load(run, engine=engine)
    images = check_images(test, input_contract(model), count=len(test))
    result = parity(model, onnx_file, images)
    assert result["images"] == len(test)
    assert result["max_abs_diff"] <= 1e-4
    assert result["top1_agreement"] >= 1 - 1 / len(test)


def _png_files(dataset, folder, count=4):
    from PIL import Image

    folder.mkdir()
    paths = []
    for i in range(count):
        image, _ = dataset[i * 7]
        paths.append(folder / f"{i}.png")
        Image.fromarray(image[0].numpy()).save(paths[-1])
    return paths


def test_predict_runtime_onnx_matches_torch(exported, digits_split, tmp_path, capsys):
    run, onnx_file = exported
    _, test = digits_split
    files = [str(p) for p in _png_files(test, tmp_path / "images")]
    assert main(["predict", str(run), *files, "--json"]) == 0
    torch_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", str(onnx_file), *files, "--json", "--runtime", "onnx"]) == 0
    onnx_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["top"][0]["class"] for r in onnx_out] == [r["top"][0]["class"] for r in torch_out]
    for a, b in zip(onnx_out, torch_out):
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) <= 1e-4


def test_failed_parity_is_loud_and_writes_nothing(exported, engine, tmp_path, monkeypatch):
    import fusion_engine.runtime.export as export

    run, onnx_file = exported
    model = load(run, engine=engine)
    with torch.no_grad():  # the graph written is the original model's; torch now computes something else
        model.fusion.concat.head[-1].bias.add_(1.0 * torch.arange(10))
    monkeypatch.setattr(
        export, "_export_graph", lambda module, path, example, names, opset=18: shutil.copy(onnx_file, path)
    )
    out = tmp_path / "bad.onnx"
    with pytest.raises(
        ExportError, match="ONNX model disagrees with torch: max abs probability difference .* > 0.0001"
    ):
        export.export_onnx(model, out, check_count=16)
    assert list(tmp_path.iterdir()) == []


def test_int8_model_and_encrypted_model_are_refused(exported, engine, tmp_path, capsys):
    from fusion_engine.artifacts.compression import compress
    from fusion_engine.runtime.export import export_onnx

    run, _ = exported
    model = load(run, engine=engine)
    compress(model, "int8")
    with pytest.raises(ExportError, match="int8 models cannot be exported"):
        export_onnx(model, tmp_path / "q.onnx")
    key = tmp_path / "key"
    key.write_text("11" * 32)
    from fusion_engine.artifacts.encryption import load_key

    save(load(run, engine=engine), tmp_path / "enc", encryption_key=load_key(key))
    code = main(["export", str(tmp_path / "enc"), "--out", str(tmp_path / "e.onnx"), "--key-file", str(key)])
    assert code == 2 and "pass --allow-plaintext" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()


def test_not_a_fusion_engine_onnx_file(tmp_path, capsys):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    code = main(["predict", str(bad), str(image), "--runtime", "onnx"])
    assert code == 2 and "onnxruntime cannot load" in capsys.readouterr().err


@pytest.fixture
def images(digits_split, tmp_path):
    return [str(p) for p in _png_files(digits_split[1], tmp_path / "images")]


def test_signed_export_predicts_with_the_right_key(exported, keys, images, capsys):
    from fusion_engine.artifacts.signing import fingerprint
    from fusion_engine.runtime.export import signature_path

    _, onnx_file = exported
    record = json.loads(signature_path(onnx_file).read_text())
    assert signature_path(onnx_file).name == "model.onnx.sig"
    assert json.loads(record["signed"])["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    public = serialization.load_pem_public_key(keys[1].read_bytes())
    assert record["public_key_fingerprint"] == fingerprint(public)
    assert main(["predict", str(onnx_file), *images, "--json", "--runtime", "onnx"]) == 0
    unchecked = json.loads(capsys.readouterr().out)
    assert main(["predict", str(onnx_file), *images, "--json", "--runtime", "onnx", "--public-key", str(keys[1])]) == 0
    assert json.loads(capsys.readouterr().out) == unchecked


def _copy(onnx_file, folder, *, with_signature=True):
    from fusion_engine.runtime.export import signature_path

    folder.mkdir()
    shutil.copy(onnx_file, folder / onnx_file.name)
    if with_signature:
        shutil.copy(signature_path(onnx_file), signature_path(folder / onnx_file.name))
    return folder / onnx_file.name


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["byte flipped", "no signature", "signature of another file", "forged digest"])
def test_tampered_or_unsigned_onnx_is_refused_with_a_public_key(case, exported, keys, images, tmp_path, capsys):
    from fusion_engine.runtime.export import sign_onnx, signature_path
    from fusion_engine.runtime.prediction import predict_onnx_files

    _, onnx_file = exported
    copy = _copy(onnx_file, tmp_path / "copy", with_signature=case != "no signature")
    if case == "byte flipped":
        _flip_byte(copy)
        match = r"model\.onnx changed after signing, or model\.onnx\.sig was made for another file"
    elif case == "no signature":
        match = r"model\.onnx is not signed: .*model\.onnx\.sig is missing; .*--sign-key PRIVATE_KEY"
    elif case == "signature of another file":
        other = tmp_path / "other.onnx"
        other.write_bytes(onnx_file.read_bytes() + b"\0")
        sign_onnx(other, keys[0])  # the same key, a valid signature, but over other bytes
        shutil.copy(signature_path(other), signature_path(copy))
        match = r"model\.onnx changed after signing, or model\.onnx\.sig was made for another file"
    else:  # flipped bytes and the recorded digest rewritten to match them, without the private key
        _flip_byte(copy)
        record = json.loads(signature_path(copy).read_text())
        signed = json.loads(record["signed"])
        signed["sha256"] = hashlib.sha256(copy.read_bytes()).hexdigest()
        record["signed"] = json.dumps(signed, sort_keys=True)
        signature_path(copy).write_text(json.dumps(record))
        match = r"model\.onnx\.sig is invalid: not made by this key for this file"
    with pytest.raises(ArtifactError, match=match):
        predict_onnx_files(copy, images, public_key=keys[1])
    assert main(["predict", str(copy), *images, "--runtime", "onnx", "--public-key", str(keys[1])]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search("^error: .*" + match, captured.err, re.MULTILINE), captured.err


def test_onnx_signed_by_another_key_is_refused(exported, images, tmp_path, capsys):
    _, onnx_file = exported
    _, other_public = generate_keypair(tmp_path / "other.pem")
    match = r"model\.onnx is signed by another key \(fingerprint [0-9a-f]{64}\), expected [0-9a-f]{64}"
    assert main(["predict", str(onnx_file), *images, "--runtime", "onnx", "--public-key", str(other_public)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search("^error: .*" + match, captured.err, re.MULTILINE), captured.err


def test_onnxruntime_runs_exactly_the_bytes_that_were_checked(exported, keys, images, tmp_path, monkeypatch):
    """The file is read once: replacing it between the check and the session changes nothing."""
    import fusion_engine.runtime.prediction as prediction
    from fusion_engine.runtime.export import verify_onnx

    _, onnx_file = exported
    copy = _copy(onnx_file, tmp_path / "copy")
    expected = prediction.predict_onnx_files(copy, images, public_key=keys[1])

    def verify_then_swap(path, public_key):
        data = verify_onnx(path, public_key)
        Path(path).write_bytes(b"swapped after the check")  # a second read would now fail to load
        return data

    monkeypatch.setattr(prediction, "verify_onnx", verify_then_swap)
    assert prediction.predict_onnx_files(copy, images, public_key=keys[1]) == expected


def test_export_with_a_bad_signing_key_writes_nothing_and_a_plain_export_drops_a_stale_signature(
    exported, engine, keys, tmp_path, monkeypatch
):
    import fusion_engine.runtime.export as export

    run, onnx_file = exported
    model = load(run, engine=engine)
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    out = tmp_path / "out" / "m.onnx"
    called = []
    monkeypatch.setattr(export, "_export_graph", lambda *a, **k: called.append(1))
    with pytest.raises(ArtifactError, match="bad.pem is not a usable unencrypted PEM private key"):
        export.export_onnx(model, out, check_count=8, signing_key=bad_key)
    assert called == [] and not out.parent.exists()  # refused before the slow export
    # the graph of the fixture (the same model) stands in for a fresh export
    monkeypatch.setattr(
        export, "_export_graph", lambda module, path, example, names, opset=18: shutil.copy(onnx_file, path)
    )
    result = export.export_onnx(model, out, check_count=8, signing_key=keys[0])
    assert result["signature"] == str(out) + ".sig" and export.verify_onnx(out, keys[1]) == out.read_bytes()
    export.export_onnx(model, out, check_count=8)  # unsigned re-export: the old .sig names other bytes
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]
