"""ONNX export of the whole fused model (preprocessing included), its parity check, and predict --runtime onnx.

Tolerances: probabilities within 1e-4 (max abs difference) of torch's on real images; on the held-out
digits (360 images) onnxruntime's top-1 equals torch's on every image but at most one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from fusion_engine import Engine, load
from fusion_engine.artifacts.store import save
from fusion_engine.cli.main import main
from fusion_engine.errors import ExportError

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
def exported(tmp_path_factory, engine, digits_split, train_and_save):
    """A tiny two-branch model trained on digits, saved, and exported with ``fusion-engine export``."""
    folder = tmp_path_factory.mktemp("export")
    train_and_save(engine, CONFIG, digits_split[0], folder / "run", epochs=8, lr=3e-3)
    code = main(["export", str(folder / "run"), "--format", "onnx", "--out", str(folder / "model.onnx"), "--json"])
    assert code == 0
    return folder / "run", folder / "model.onnx"


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
        model.fusion.head[-1].bias.add_(1.0 * torch.arange(10))
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
