"""Tests of the handcrafted-descriptor backbones: values, options, contract, and a fused model."""

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from fusion_engine_handcrafted import (
    HandcraftedBackbone,
    color_histogram_backbone,
    handcrafted_backbone,
    hog_backbone,
    lbp_backbone,
    plugin,
)

import fusion_engine
from fusion_engine import ConfigError, Engine
from fusion_engine.core.data import load_dataset
from fusion_engine.core.handcrafted import color_histogram, handcrafted_features, hog_features, lbp_histogram
from fusion_engine.testing import check_backbone, check_plugin
from fusion_engine.training.feature_cache import FeatureCache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # test machines are small and shared

NAMES = ["hog", "color_histogram", "lbp", "handcrafted"]
CNN = {"name": "timm", "model": "test_resnet", "input_size": 32}


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins([plugin], entry_points=False)


# --- values and shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, options, dim",
    [
        (hog_backbone, {}, 324),
        (hog_backbone, {"size": 64}, 49 * 4 * 9),
        (hog_backbone, {"size": 64, "cell": 16, "bins": 6}, 9 * 4 * 6),
        (color_histogram_backbone, {}, 24),
        (color_histogram_backbone, {"size": 64, "bins": 4}, 12),
        (lbp_backbone, {}, 4 * 59),
        (lbp_backbone, {"size": 64, "grid": 3}, 9 * 59),
        (handcrafted_backbone, {}, 324 + 24),
        (handcrafted_backbone, {"kinds": ["lbp", "color", "hog"], "size": 64}, 236 + 24 + 1764),
    ],
)
def test_shapes_and_data_config(factory, options, dim):
    backbone = factory(**options)
    size = options.get("size", 32)
    assert isinstance(backbone, HandcraftedBackbone) and backbone.feature_dim == dim
    assert backbone.data_config == {
        "input_size": (3, size, size),
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "interpolation": "bilinear",
    }
    out = backbone(images(size=size))
    assert out.shape == (3, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_features_are_the_public_functions():
    x = images(4)
    assert torch.equal(hog_backbone()(x), torch.from_numpy(hog_features(x)))
    x64 = images(2, size=64)
    assert torch.equal(hog_backbone(size=64, cell=16)(x64), torch.from_numpy(hog_features(x64, size=64, cell=16)))
    assert torch.equal(color_histogram_backbone(bins=5)(x), torch.from_numpy(color_histogram(x, bins=5)))
    assert torch.equal(lbp_backbone(grid=3)(x), torch.from_numpy(lbp_histogram(x, grid=3)))
    for kinds in (["hog", "color"], ["lbp"], ["color", "lbp", "hog"]):
        assert torch.equal(handcrafted_backbone(kinds)(x), torch.from_numpy(handcrafted_features(x, kinds=kinds)))


def test_grey_input_and_values_just_outside_0_1():
    backbone = handcrafted_backbone(["hog", "color", "lbp"])
    grey = images(2)[:, :1]
    assert torch.allclose(backbone(grey.expand(-1, 3, -1, -1)), backbone(grey), atol=1e-5)  # luma of R=G=B
    x = images(2)
    x[0, 0, 0, 0], x[1, 2, 3, 4] = 1 + 1e-6, -1e-7  # float rounding after a resize: not an error
    assert torch.equal(backbone(x), backbone(x.clamp(0, 1)))


def test_no_parameters_no_state_no_gradient_and_device_dtype_follow_the_input():
    backbone = handcrafted_backbone(["hog", "lbp"])
    assert list(backbone.parameters()) == [] and backbone.state_dict() == {}
    x = images(2).double().requires_grad_(True)
    out = backbone.to("cpu")(x)
    assert out.dtype == torch.float64 and out.device == x.device and not out.requires_grad
    assert "kinds=['hog', 'lbp'], size=32" in repr(backbone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    backbone = handcrafted_backbone().to("cuda")
    x = images(2)
    out = backbone(x.to("cuda"))
    assert out.device.type == "cuda" and torch.equal(out.cpu(), backbone(x))
    check_backbone(handcrafted_backbone, device="cuda")


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds, message",
    [
        (["sift"], r"one or more of hog, color, lbp; unknown: 'sift'"),
        ([], r"got an empty list"),
        (["hog", "color", "hog"], r"'hog' more than once"),
    ],
)
def test_kinds_are_validated(kinds, message):
    with pytest.raises(ValueError, match=message):
        handcrafted_backbone(kinds)


@pytest.mark.parametrize(
    "factory, options, message",
    [
        (hog_backbone, {"size": 4}, r"hog: size must be an integer >= 8"),
        (hog_backbone, {"size": 16, "cell": 8, "block": 3}, r"hog: HOG needs .*size // cell >= block"),
        (color_histogram_backbone, {"bins": 0}, r"color_histogram: .*bins >= 1"),
        (lbp_backbone, {"grid": 0}, r"lbp: LBP needs grid >= 1"),
    ],
)
def test_descriptor_parameters_are_validated(factory, options, message):
    with pytest.raises(ValueError, match=message):
        factory(**options)


def test_engine_validates_options_before_building(engine):
    def build(backbone):
        return engine.build({"backbones": [backbone], "num_classes": 3})

    with pytest.raises(ConfigError, match=r"backbones\[0\].*option 'kinds.0'.*'hog', 'color' or 'lbp'"):
        build({"name": "handcrafted", "kinds": ["sift"]})
    with pytest.raises(ConfigError, match=r"backbones\[0\]: backbone 'handcrafted': handcrafted: kinds .* empty"):
        build({"name": "handcrafted", "kinds": []})
    with pytest.raises(ConfigError, match=r"unknown option 'sise' \(did you mean 'size'\?\)"):
        build({"name": "hog", "sise": 64})
    assert build({"name": "handcrafted", "kinds": ["lbp"], "size": 64}).branches[0].feature_dim == 236


# --- the plugin ---------------------------------------------------------------------------------


def test_plugin_registers_four_backbones(engine):
    components = {c.name: c for c in engine.components("backbone") if c.plugin == plugin.__name__}
    assert sorted(components) == sorted(NAMES)
    assert all(c.description for c in components.values())
    assert components["handcrafted"].describe_options() == {
        "kinds": "list[Literal['hog', 'color', 'lbp']] = ['hog', 'color']",
        "size": "int = 32",
    }


def test_conformance(engine):
    checked = check_plugin(plugin)
    assert sorted(checked) == sorted(f"backbone:{n}" for n in NAMES)
    check_backbone("handcrafted", engine=engine, kinds=["hog", "color", "lbp"], size=64)


def installed() -> bool:
    try:
        distribution("fusion-engine-handcrafted")
    except PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(not installed(), reason="pip install ./plugins/fusion-engine-handcrafted first")


@needs_install
def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="fusion_engine")}
    assert eps.get("handcrafted") == "fusion_engine_handcrafted.plugin"


# --- fused with a CNN branch ----------------------------------------------------------------------


def test_fused_with_a_cnn_branch_builds_trains_evaluates_saves(engine, tmp_path):
    torch.manual_seed(0)
    model = engine.build(
        {"backbones": [{"name": "handcrafted", "kinds": ["hog", "color"]}, CNN], "fusion": "concat", "num_classes": 10}
    )
    assert [b.feature_dim for b in model.branches] == [348, 96]
    assert not [k for k in model.state_dict() if k.startswith("branches.0.")]  # the handcrafted branch has no state
    digits = load_dataset("digits")
    train, test = digits.subset(np.arange(0, 1797, 4)), digits.subset(np.arange(1, 1797, 8))
    history = model.fit(
        train, epochs=30, lr=1e-2, cache_dir=tmp_path / "cache", progress=False, log=lambda *a, **k: None
    )
    assert history["mode"] == "frozen" and history["epochs"]
    report = model.evaluate(test, cache=FeatureCache(tmp_path / "cache"), progress=False)
    assert report["n"] == len(test) and report["accuracy"] > 0.8, report["accuracy"]
    assert report["branches"]["handcrafted"] > 0.8  # HOG + colour alone reads digits well
    model.save(tmp_path / "run")
    loaded = fusion_engine.load(tmp_path / "run", engine=engine)
    x = torch.rand(3, 1, 8, 8)
    assert np.allclose(loaded.predict_proba(x), model.predict_proba(x), atol=1e-6)


@pytest.mark.slow  # two CLI subprocesses: train (digits, 3 epochs) and evaluate
@needs_install
def test_cli_train_and_evaluate(tmp_path):
    bin_dir = Path(sys.executable).parent
    cli = (
        [str(bin_dir / "fusion-engine")]
        if (bin_dir / "fusion-engine").is_file()
        else [sys.executable, "-m", "fusion_engine"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSION_ENGINE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    config = tmp_path / "fused.json"
    config.write_text(
        json.dumps({"backbones": [{"name": "handcrafted", "kinds": ["hog", "color"]}, CNN], "fusion": "concat"})
    )
    run, cache = tmp_path / "run", tmp_path / "cache"

    def call(*args):
        result = subprocess.run(cli + list(args), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    call(
        "train",
        "--config",
        str(config),
        "--data",
        "digits",
        "--out",
        str(run),
        "--epochs",
        "3",
        "--cache-dir",
        str(cache),
        "-q",
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert {
        "kind": "backbone",
        "name": "handcrafted",
        "plugin": "handcrafted",
        "version": "0.1.0",
        "distribution": "fusion-engine-handcrafted",
    } in manifest["components"]
    report = json.loads(call("evaluate", str(run), "--data", "digits", "--json", "--cache-dir", str(cache), "-q"))
    assert report["n"] == 1797 and set(report["branches"]) == {"handcrafted", "timm:test_resnet"}
    assert report["branches"]["handcrafted"] > 0.9
