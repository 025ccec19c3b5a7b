"""int8 extraction (issue #14): each branch's graph quantised statically with onnxruntime, calibrated on
training images, checked against torch on real photos, cached like the fp32 graph, under its own key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusion_engine.runtime.onnx_cache as onnx_cache
import fusion_engine.training.feature_cache as feature_cache
from fusion_engine import Engine
from fusion_engine.core.data import load_dataset
from fusion_engine.training.feature_cache import FeatureCache, branch_key, compare

pytestmark = pytest.mark.skipif(not feature_cache.onnx_available(), reason="needs onnx, onnxruntime, onnxscript")
RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}


@pytest.fixture(scope="module")
def photos():
    data = load_dataset("cifar10-sample")  # real photos, 32 px
    return data.subset(list(range(96)))


@pytest.fixture(scope="module")
def model(photos):
    torch.manual_seed(0)
    return Engine.from_plugins().build({"backbones": [RESNET], "fusion": "concat"}, class_names=photos.classes)


def test_int8_features_agree_with_float_ones_within_the_recorded_tolerance(model, photos, tmp_path):
    onnx_cache.forget()
    lines = []
    cache = FeatureCache(tmp_path, runtime="int8", log=lines.append)
    got = np.asarray(cache.features(model, photos, progress=False)[0])
    assert [p.runtime for p in cache.plans] == ["int8"]
    records = {r["kind"]: r for r in cache.checks.values()}
    assert records["int8"]["passed"] and records["int8"]["min_cosine"] >= feature_cache.INT8_MIN_COSINE
    assert any(line.startswith("int8 graph") and "lowest cosine" in line for line in lines)
    expected = np.asarray(FeatureCache(enabled=False, runtime="torch").features(model, photos, progress=False)[0])
    check = compare(got, expected)  # every image, not only the few the graph was checked on
    assert check["min_cosine"] >= feature_cache.INT8_MIN_COSINE, check
    assert 0 < check["max_abs_diff"] < 0.2 * check["scale"]  # quantised: close, not equal

    # the int8 graph is cached beside the fp32 one; a second run quantises nothing and hits its entry
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2
    onnx_cache.forget()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(feature_cache, "quantize_graph", lambda *a, **k: pytest.fail("quantised again"))
        again = FeatureCache(tmp_path, runtime="int8")
        np.testing.assert_array_equal(np.asarray(again.features(model, photos, progress=False)[0]), got)
    assert again.stats["hits"] == 1


def test_the_int8_key_differs_from_the_fp32_key(model, photos, tmp_path):
    digest = photos.digest()
    fp32 = FeatureCache(tmp_path, runtime="onnx")
    fp32.features(model, photos.subset(list(range(8))), progress=False)
    int8 = FeatureCache(tmp_path, runtime="int8")
    int8.features(model, photos.subset(list(range(8))), progress=False)
    assert int8.plans[0].sha256 != fp32.plans[0].sha256
    keys = {
        branch_key(model, 0, digest, r, p) for r, p in [("torch", None), ("onnx", None), ("int8", int8.plans[0].sha256)]
    }
    assert len(keys) == 3
    assert len(list(tmp_path.glob("*.npy"))) == 2  # one entry each, neither read for the other


def test_a_failed_int8_check_falls_back_to_the_fp32_graph(model, photos, tmp_path, monkeypatch):
    onnx_cache.forget()
    monkeypatch.setattr(feature_cache, "INT8_MIN_COSINE", 1.01)
    lines = []
    cache = FeatureCache(tmp_path, runtime="int8", log=lines.append)
    with pytest.warns(feature_cache.ExtractionRuntimeWarning, match="int8 graph"):
        cache.features(model, photos.subset(list(range(8))), progress=False)
    assert [p.runtime for p in cache.plans] == ["onnx"]
    assert any("extracting it with onnx instead" in line for line in lines)


def test_export_int8_writes_a_checked_int8_graph_that_predict_runs(model, photos, tmp_path, capsys):
    from fusion_engine.cli.main import main
    from fusion_engine.runtime.export import read_metadata

    model.fit(photos, extract_runtime="torch", epochs=5, baselines=False, progress=False, log=None)
    model.save(tmp_path / "run")
    out = tmp_path / "model.int8.onnx"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--int8"]) != 0
    assert "--calibration-data" in capsys.readouterr().err and not out.exists()
    args = ["--check-data", "cifar10-sample", "--check-images", "32", "--calibration-data", "cifar10-sample"]
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--int8", *args]) == 0
    printed = capsys.readouterr().out
    assert "int8, calibrated on cifar10-sample" in printed and "top-1 agreement" in printed
    meta = read_metadata(out)
    assert meta["quantization"]["method"] == "int8-static" and meta["quantization"]["images"] == 256
    import onnx

    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(out)).graph.node)  # really int8
    picture = tmp_path / "cat.png"
    from PIL import Image

    Image.fromarray(photos[0][0].permute(1, 2, 0).numpy()).save(picture)
    assert main(["predict", str(out), str(picture), "--runtime", "onnx", "--top", "1"]) == 0
    assert "cat.png" in capsys.readouterr().out


def test_the_int8_inference_runtime_needs_calibration_data_and_agrees_with_torch(model, photos):
    from fusion_engine import ConfigError
    from fusion_engine.runtime.runtimes import RUNTIMES, make_runner

    assert "int8" in RUNTIMES  # bench lists it beside the others
    images = torch.stack([photos[i][0] for i in range(32)]).float() / 255
    with pytest.raises(ConfigError, match="calibrates on real images"):
        make_runner(model, "int8", example=images)
    run = make_runner(model, "int8", example=images, calibration=photos)
    with torch.inference_mode():
        expected = model.eval()(images)
    got = run(images)
    assert got.shape == expected.shape
    assert compare(got.numpy(), expected.numpy())["min_cosine"] > 0.95
