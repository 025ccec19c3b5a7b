"""Tests of the cifar_resnet plugin: architecture, weight loading, plugin wiring, real accuracy."""

import argparse
import inspect
import os
import typing
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pluggy
import pytest
import torch
from fusion_engine_cifar_resnet import DEPTHS, CifarResNet, plugin
from fusion_engine_cifar_resnet.model import BasicBlock
from fusion_engine_cifar_resnet.plugin import cifar_resnet_backbone
from fusion_engine_cifar_resnet.weights import PRETRAINED_FILES
from safetensors.torch import save_file

from fusion_engine import Engine, WeightsError, hookspecs

# shared/ is the sibling of the repository root (plugins/fusion-engine-cifar-resnet/tests/ is 3 deep)
SHARED = Path(os.environ.get("FUSION_ENGINE_SHARED") or Path(__file__).resolve().parents[4] / "shared")
WEIGHTS = SHARED / "weights"
CIFAR = SHARED / "data" / "cifar10_jpeg_train8k.npz"
needs_shared = pytest.mark.skipif(
    not (CIFAR.is_file() and all((WEIGHTS / f).is_file() for f in PRETRAINED_FILES.values())),
    reason=f"real CIFAR ResNet weights / CIFAR-10 data not found under {SHARED} (set FUSION_ENGINE_SHARED)",
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def save_random_weights(path: Path, model: str) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict laid out like the shipped files (float16 convs, no counters)."""
    state = {
        k: v.half() if v.ndim > 1 else v
        for k, v in CifarResNet(DEPTHS[model]).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(state, path)
    return state


def assert_holds(backbone, state):
    for k, v in state.items():
        got = backbone.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, v.float()), k


# --- architecture -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, params",
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
    ],
)
def test_parameter_counts_match_the_paper(model, params):
    assert sum(p.numel() for p in cifar_resnet_backbone(model).parameters()) == params


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 32, 32)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 16, 16)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert not short[:, :8].any() and not short[:, 24:].any()
    assert block(x).shape == (2, 32, 16, 16)
    assert BasicBlock(32, 64, stride=2).shortcut(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)
    identity = BasicBlock(16, 16)
    assert identity.shortcut(x) is x
    assert {n.split(".")[0] for n, _ in block.named_parameters()} == {"conv1", "bn1", "conv2", "bn2"}


def test_backbone_contract():
    backbone = cifar_resnet_backbone("resnet20")
    assert backbone.feature_dim == 64 and backbone.output_kind == "map" and not backbone.training
    assert backbone.data_config == {
        "input_size": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        stages = backbone.forward_stages(x)
        features = backbone(x)
        logits = backbone.classify(x)
    assert [s.shape for s in stages] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert features.shape == (2, 64, 8, 8) and torch.equal(stages[-1], features)
    assert torch.allclose(logits, backbone.linear(features.mean(dim=(2, 3))))
    assert torch.equal(logits, CifarResNet.forward(backbone, x))


def test_factory_options_are_annotated_with_defaults():
    params = inspect.signature(cifar_resnet_backbone).parameters
    assert list(params) == ["model", "weights", "pretrained"]
    for p in params.values():
        assert p.kind is p.POSITIONAL_OR_KEYWORD
        assert p.annotation is not p.empty and p.default is not p.empty
    assert typing.get_args(params["model"].annotation) == tuple(DEPTHS)  # engine validates the name


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="resnet20, resnet32, resnet44, resnet56"):
        cifar_resnet_backbone("resnet18")


# --- weight files -------------------------------------------------------------------------


def test_safetensors_weights_load_strictly_as_float32(tmp_path):
    state = save_random_weights(tmp_path / "w.safetensors", "resnet20")
    assert_holds(cifar_resnet_backbone("resnet20", weights=str(tmp_path / "w.safetensors")), state)


@pytest.mark.parametrize("file_model, model", [("resnet56", "resnet20"), ("resnet20", "resnet56")])
def test_wrong_depth_weights_are_named(tmp_path, file_model, model):
    path = tmp_path / f"{file_model}.safetensors"
    save_random_weights(path, file_model)
    with pytest.raises(WeightsError, match=rf"{path.name}.*ResNet-{file_model[6:]}.*not a {model}"):
        cifar_resnet_backbone(model, weights=str(path))


def test_foreign_keys_are_listed(tmp_path):
    state = {
        k.replace("linear", "fc"): v for k, v in save_random_weights(tmp_path / "a.safetensors", "resnet20").items()
    }
    save_file(state, tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match=r"b\.safetensors.*missing \['linear\.bias'.*unexpected \['fc\.bias'"):
        cifar_resnet_backbone(weights=str(tmp_path / "b.safetensors"))


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nowhere.safetensors"):
        cifar_resnet_backbone(weights=str(tmp_path / "nowhere.safetensors"))


@pytest.mark.parametrize("name", ["bad.safetensors", "bad.pth", "bad.npz"])
def test_malformed_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"not a weights file at all")
    with pytest.raises(WeightsError, match=name):
        cifar_resnet_backbone(weights=str(tmp_path / name))


def test_torch_checkpoint_is_read_weights_only(tmp_path):
    state = save_random_weights(tmp_path / "w.safetensors", "resnet20")
    # akamaster's own checkpoint layout: {"state_dict": {"module.<key>": tensor}, ...}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7}, tmp_path / "ckpt.pth")
    assert_holds(cifar_resnet_backbone(weights=str(tmp_path / "ckpt.pth")), state)
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="refusing to unpickle .*pickled.pt"):
        cifar_resnet_backbone(weights=str(tmp_path / "pickled.pt"))


def test_pretrained_found_through_env(tmp_path, monkeypatch):
    state = save_random_weights(tmp_path / PRETRAINED_FILES["resnet56"], "resnet56")
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", os.pathsep.join([str(tmp_path / "empty"), str(tmp_path)]))
    assert_holds(cifar_resnet_backbone("resnet56", pretrained=True), state)


def test_pretrained_missing_says_how_to_pass_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSION_ENGINE_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError, match=r"FUSION_ENGINE_WEIGHTS_DIR is not set.*weights=PATH"):
        cifar_resnet_backbone(pretrained=True)
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet20_cifar10_akamaster.safetensors: not in FUSION_ENGINE_WEIGHTS_DIR"):
        cifar_resnet_backbone(pretrained=True)
    with pytest.raises(WeightsError, match="no pretrained weights are published for resnet32"):
        cifar_resnet_backbone("resnet32", pretrained=True)


# --- plugin wiring ------------------------------------------------------------------------


def test_plugin_registers_through_pluggy():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    registered = []
    pm.hook.register_backbones(
        register=lambda name, factory, description="": registered.append((name, factory, description))
    )
    assert registered == [
        ("cifar_resnet", cifar_resnet_backbone, "CIFAR ResNet-20/32/44/56 (option-A shortcuts), not in timm")
    ]


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="fusion_engine")}
    assert eps.get("cifar_resnet") == "fusion_engine_cifar_resnet.plugin"


# --- real weights and data ----------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("model", ["resnet20", "resnet56"])
def test_shipped_weights_match_keys_exactly(model):
    from safetensors import safe_open

    with safe_open(WEIGHTS / PRETRAINED_FILES[model], "pt") as f:
        keys = set(f.keys())
    expected = {k for k in CifarResNet(DEPTHS[model]).state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == expected


@needs_shared
@pytest.mark.parametrize(
    "model, step, floor",
    [
        # measured: resnet20 86.4% on x[::4]; resnet56 87.9% on x[::8] (README: 81.0% / 83.2% on the JPEG test set)
        ("resnet20", 4, 0.83),
        ("resnet56", 8, 0.85),
    ],
)
def test_real_accuracy_on_jpeg_cifar10(model, step, floor, monkeypatch):
    # the npz is sorted by class, so take every step-th image: 8000/step images, 800/step per class
    data = np.load(CIFAR)
    x, y = data["x"][::step], data["y"][::step]
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(WEIGHTS))
    backbone = cifar_resnet_backbone(model, pretrained=True)
    images = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    with torch.inference_mode():
        accuracy = (backbone.classify(images).argmax(1).numpy() == y).mean()
    print(f"{model}: top-1 {accuracy:.4f} on {len(y)} JPEG CIFAR-10 training images")
    assert accuracy > floor


# --- inside the engine --------------------------------------------------------------------


def build(backbone: dict, fusion: str = "concat"):
    engine = Engine.from_plugins([plugin], entry_points=False)
    return engine.build({"backbones": [{"name": "cifar_resnet", **backbone}], "fusion": fusion, "num_classes": 10})


def test_engine_builds_a_fused_model():
    model = build({"model": "resnet20"}).eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert [b.feature_dim for b in model.branches] == [64]
    assert build({"model": "resnet32", "extractor": "multiscale"}).branches[0].feature_dim == 16 + 32 + 64


def test_engine_rejects_bad_options_before_building():
    with pytest.raises(ValueError, match="option 'model'.*'resnet20', 'resnet32', 'resnet44' or 'resnet56'"):
        build({"model": "resnet18"})
    with pytest.raises(ValueError, match="unknown option 'modle'"):
        build({"modle": "resnet20"})


def test_engine_preprocessing_matches_the_trained_normalisation(tmp_path):
    # engine: [0, 1] images -> data_config normalisation -> backbone -> avg; the original head on
    # those features must give the logits of classify() on images normalised by hand
    save_random_weights(tmp_path / "w.safetensors", "resnet20")
    model = build({"model": "resnet20", "weights": str(tmp_path / "w.safetensors"), "extractor": "avg"}).eval()
    backbone = model.branches[0].backbone
    images = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        features = model.branch_features(images)[0]
        assert torch.allclose(backbone.linear(features), backbone.classify((images - MEAN) / STD), atol=1e-5)
