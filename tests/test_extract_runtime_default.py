"""The fastest correct extraction path by default (issue #14): the feature cache recognises a reloaded
model's features; onnx is the default runtime on the CPU when onnxruntime is importable, each branch's
graph checked against torch once (a failed check falls back to torch and says so); exported graphs are
kept on disk, so a second run neither exports nor checks again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits_dataset

import fusion_engine
import fusion_engine.runtime.onnx_cache as onnx_cache
import fusion_engine.training.feature_cache as feature_cache
from fusion_engine import Engine
from fusion_engine.training.config import TrainConfig
from fusion_engine.training.feature_cache import ExtractionRuntimeWarning, FeatureCache, resolve_runtime

needs_onnx = pytest.mark.skipif(not feature_cache.onnx_available(), reason="needs onnx, onnxruntime, onnxscript")
RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}


@pytest.fixture(scope="module")
def data():
    return four_digits_dataset(48)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Engine.from_plugins().build({"backbones": [RESNET], "fusion": "concat"}, class_names=CLASSES)


@pytest.fixture(autouse=True)
def no_graphs_in_memory():
    onnx_cache.forget()  # each test sees only what is on its own disk
    yield
    onnx_cache.forget()


def test_a_saved_and_reloaded_model_hits_the_entries_its_training_wrote(model, data, tmp_path):
    cache_dir = tmp_path / "cache"
    model.fit(data, cache_dir=cache_dir, extract_runtime="torch", epochs=1, baselines=False, progress=False, log=None)
    written = FeatureCache(cache_dir).features(model, data, progress=False)[0]
    model.save(tmp_path / "run")
    entries = sorted(cache_dir.glob("*.npy"))
    loaded = fusion_engine.load(tmp_path / "run")
    assert loaded.config.backbones[0].options != model.config.backbones[0].options  # the options did change
    cache = FeatureCache(cache_dir)
    again = cache.features(loaded, data, progress=False)[0]
    assert cache.stats == {"hits": 1, "extracted": 0, "extract_seconds": 0.0}
    assert sorted(cache_dir.glob("*.npy")) == entries
    np.testing.assert_array_equal(np.asarray(again), np.asarray(written))


def test_the_default_runtime_is_onnx_on_the_cpu_when_onnxruntime_is_importable(monkeypatch):
    assert TrainConfig().extract_runtime == "auto"
    monkeypatch.setattr(feature_cache, "onnx_available", lambda: True)
    assert resolve_runtime("auto", "cpu") == "onnx"
    assert resolve_runtime("auto", "cuda") == "torch"  # GPUs keep torch
    assert resolve_runtime("torch", "cpu") == "torch"  # --extract-runtime torch keeps the old path
    monkeypatch.setattr(feature_cache, "onnx_available", lambda: False)
    assert resolve_runtime("auto", "cpu") == "torch"


def test_without_onnxruntime_auto_extracts_with_torch(model, data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    cache = FeatureCache(enabled=False, runtime="auto")
    cache.features(model, data, progress=False)
    assert [p.runtime for p in cache.plans] == ["torch"] and not cache.sessions


@needs_onnx
def test_auto_uses_onnx_after_a_parity_check_and_a_second_run_neither_exports_nor_checks(model, data, tmp_path):
    lines = []
    cache = FeatureCache(tmp_path, runtime="auto", log=lines.append)
    onnx_features = cache.features(model, data, progress=False)[0]
    assert [p.runtime for p in cache.plans] == ["onnx"]
    (record,) = cache.checks.values()
    assert record["passed"] and record["max_abs_diff"] <= feature_cache.ONNX_TOLERANCE * max(record["scale"], 1)
    assert len(lines) == 1 and "max abs diff" in lines[0] and ": used" in lines[0]
    torch_features = FeatureCache(tmp_path, runtime="torch").features(model, data, progress=False)[0]
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-4, rtol=0)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # onnx features keep their own key

    (graph,) = (tmp_path / "onnx").glob("*.onnx")
    mtime = graph.stat().st_mtime_ns
    onnx_cache.forget()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(feature_cache, "branch_graph", no_export)
        lines.clear()
        again = FeatureCache(tmp_path, runtime="auto", log=lines.append)
        again.features(model, data.subset(list(range(20))), progress=False)  # a miss: the cached graph extracts it
    assert again.stats["extracted"] == 1 and [p.runtime for p in again.plans] == ["onnx"] and lines == []
    assert graph.stat().st_mtime_ns == mtime and len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


@needs_onnx
def test_a_failed_parity_check_falls_back_to_torch_and_says_so(model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "ONNX_TOLERANCE", -1.0)  # no graph can pass
    lines = []
    cache = FeatureCache(tmp_path, runtime="auto", log=lines.append)
    with pytest.warns(ExtractionRuntimeWarning, match="disagrees with torch"):
        features = cache.features(model, data, progress=False)[0]
    assert [p.runtime for p in cache.plans] == ["torch"]
    cache.features(model, data.subset(list(range(8))), progress=False)  # another dataset: said once
    fallback = [line for line in lines if "instead" in line]
    assert len(fallback) == 1 and "max abs diff" in fallback[0] and "extracting it with torch instead" in fallback[0]
    reference = FeatureCache(tmp_path, runtime="torch")
    np.testing.assert_array_equal(reference.features(model, data, progress=False)[0], features)
    assert reference.stats["hits"] == 1  # stored under torch's key: they are torch's features


@needs_onnx
def test_a_branch_that_cannot_be_exported_is_extracted_with_torch_and_says_so(model, data, tmp_path, monkeypatch):
    def fails(*args, **kwargs):  # as torch.onnx fails on a branch with numpy inside (handcrafted features)
        raise feature_cache.ExportError("torch.onnx.export failed: GuardOnDataDependentSymNode")

    monkeypatch.setattr(feature_cache, "branch_graph", fails)
    monkeypatch.setattr(feature_cache, "UNEXPORTABLE", set())
    lines = []
    cache = FeatureCache(tmp_path, runtime="auto", log=lines.append)
    features = cache.features(model, data, progress=False)[0]
    assert [p.runtime for p in cache.plans] == ["torch"]
    assert lines == [
        "extraction: timm:test_resnet has no ONNX graph (torch.onnx.export failed: GuardOnDataDependentSymNode); "
        "it runs in torch"
    ]
    again = FeatureCache(tmp_path / "other", runtime="auto", log=lines.append)
    again.features(model, data, progress=False)
    assert len(lines) == 1 and [p.runtime for p in again.plans] == ["torch"]  # not tried, nor said, twice
    reference = FeatureCache(tmp_path, runtime="torch")
    np.testing.assert_array_equal(reference.features(model, data, progress=False)[0], features)


@needs_onnx
def test_a_graph_made_without_a_cache_folder_is_stored_when_one_is_used(model, data, tmp_path, monkeypatch):
    FeatureCache(enabled=False, runtime="onnx").features(model, data.subset(list(range(8))), progress=False)
    monkeypatch.setattr(feature_cache, "branch_graph", lambda *a, **k: pytest.fail("exported again"))
    FeatureCache(tmp_path, runtime="onnx").features(model, data.subset(list(range(8))), progress=False)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1 and len(list((tmp_path / "onnx").glob("*.json"))) == 1


def test_evaluate_hits_the_held_out_features_train_cached(data, tmp_path):
    import json

    from fusion_engine.cli.main import main

    x = np.stack([np.asarray(data[i][0]) for i in range(len(data))])
    np.savez(tmp_path / "tr.npz", x=x[:32], y=np.asarray(data.targets)[:32], classes=CLASSES)
    np.savez(tmp_path / "te.npz", x=x[32:], y=np.asarray(data.targets)[32:], classes=CLASSES)
    (tmp_path / "config.json").write_text(json.dumps({"backbones": [RESNET]}))
    cache, run = tmp_path / "cache", tmp_path / "run"
    common = ["--cache-dir", str(cache), "-q"]
    train = ["train", "--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "tr.npz"), "--epochs", "1"]
    assert main([*train, "--data-test", str(tmp_path / "te.npz"), "--out", str(run), *common]) == 0
    entries = sorted(cache.glob("*.npy"))
    assert main(["evaluate", str(run), "--data", str(tmp_path / "te.npz"), "--no-report", *common]) == 0
    assert sorted(cache.glob("*.npy")) == entries  # no second entry for the same images
