"""The built-in timm backbone: local weights, indexed weights, offline behaviour, errors, stages."""

from __future__ import annotations

import socket
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fusion_engine import ConfigError, Engine, WeightsError
from fusion_engine.errors import RandomInitWarning

MOBILENET = "mobilenetv2_100.tf1_quant_in1k"


@pytest.fixture
def engine():
    return Engine.from_plugins(entry_points=False)


@pytest.fixture
def mobilenet_file(shared_dir):
    path = shared_dir / "weights" / f"{MOBILENET}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def reference_mobilenet(path):
    """As /work/shared/weights/README.md loads it, with timm's own pretrained loader."""
    import timm

    return timm.create_model(
        "mobilenetv2_100",
        pretrained=True,
        pad_type="same",
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path), mean=(0.5,) * 3, std=(0.5,) * 3),
    ).eval()


def test_local_weights_give_the_same_features_as_timm(engine, mobilenet_file):
    model = engine.build(
        {
            "backbones": [
                {
                    "name": "timm",
                    "model": "mobilenetv2_100",
                    "model_kwargs": {"pad_type": "same"},
                    "weights": str(mobilenet_file),
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                }
            ],
            "num_classes": 2,
        }
    ).eval()
    assert model.branches[0].backbone.data_config["input_size"] == (3, 224, 224)

    torch.manual_seed(0)
    images = torch.rand(2, 3, 224, 224)
    normalised = (images - 0.5) / 0.5
    with torch.no_grad():
        expected = reference_mobilenet(mobilenet_file)(normalised)
        through_branch = model.branches[0](normalised)
        through_model = model.branch_features(images)[0]  # the model's own preprocessing
    assert expected.shape == (2, 1280)
    assert expected.abs().max() > 0.1  # really the pretrained weights, not zeros
    torch.testing.assert_close(through_branch, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(through_model, expected, atol=1e-5, rtol=0)


def test_weights_by_index_name(engine, shared_dir, mobilenet_file, monkeypatch):
    config = {"backbones": [{"name": "timm", "weights": MOBILENET}], "num_classes": 2}
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fusion-engine-weights")  # which ships these weights too
    with pytest.raises(WeightsError, match=r"not a name in the index\.json.*FUSION_ENGINE_WEIGHTS_DIR"):
        engine.build(config)  # no weights folder configured

    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(shared_dir / "weights"))
    model = engine.build(config).eval()
    assert model.branch_names == [f"timm:{MOBILENET}"]
    backbone = model.branches[0].backbone
    assert backbone.data_config == {
        "input_size": (3, 224, 224),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
    }
    assert backbone.model.default_cfg["architecture"] == "mobilenetv2_100"
    # pad_type="same" from the index's timm_kwargs: timm then uses its dynamic 'same' padding convolution
    assert any(type(m).__name__ == "Conv2dSame" for m in backbone.model.modules())

    normalised = (torch.rand(1, 3, 224, 224) - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            model.branches[0](normalised), reference_mobilenet(mobilenet_file)(normalised), atol=1e-5, rtol=0
        )


def test_mobilenet_v1_widths_timm_does_not_register(engine, shared_dir, monkeypatch):
    if not (shared_dir / "weights" / "mobilenetv1_025.tf1_quant_in1k.safetensors").is_file():
        pytest.skip("../shared/weights has no MobileNetV1 0.25 weights")
    from timm.models.efficientnet import _gen_mobilenet_v1

    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(shared_dir / "weights"))
    model = engine.build(
        {"backbones": [{"name": "timm", "weights": "mobilenetv1_025.tf1_quant_in1k"}], "num_classes": 2}
    ).eval()
    backbone = model.branches[0].backbone
    assert backbone.data_config["input_size"] == (3, 128, 128)
    assert backbone.rebuild_options["model"] == "mobilenetv1_025"
    reference = _gen_mobilenet_v1("mobilenetv1_100", channel_multiplier=0.25, pad_type="same", num_classes=0)
    state = load_file(shared_dir / "weights" / "mobilenetv1_025.tf1_quant_in1k.safetensors")
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier")})
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        expected = reference.eval()(images)
        torch.testing.assert_close(model.branches[0](images), expected, atol=1e-5, rtol=0)
    assert expected.shape == (2, 256) and expected.abs().max() > 0.1
    # rebuilt from its saved options alone (as an artifact is), the same network comes back
    rebuilt = engine.build({"backbones": [{"name": "timm", **backbone.rebuild_options}], "num_classes": 2})
    assert rebuilt.branches[0].backbone.model.num_features == 256

    with pytest.raises(ConfigError, match="unknown timm model 'mobilenetv1_0x'"):
        engine.build({"backbones": [{"name": "timm", "model": "mobilenetv1_0x"}], "num_classes": 2})


def test_missing_weights_file(engine, tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(WeightsError, match=rf"weights file {missing} does not exist"):
        engine.build(
            {"backbones": [{"name": "timm", "model": "test_resnet", "weights": str(missing)}], "num_classes": 2}
        )


def test_weights_of_another_architecture(engine, mobilenet_file):
    with pytest.raises(WeightsError) as info:
        engine.build(
            {"backbones": [{"name": "timm", "model": "test_resnet", "weights": str(mobilenet_file)}], "num_classes": 2}
        )
    message = str(info.value)
    assert f"weights file {mobilenet_file} does not fit timm model 'test_resnet'" in message
    assert "missing" in message and "unexpected" in message and "Check the model name" in message


def test_weights_of_another_width(engine, mobilenet_file):
    # the same layers at another width: every key is there, the shapes differ
    with pytest.raises(WeightsError, match=r"does not fit timm model .mobilenetv2_050.*another shape"):
        engine.build(
            {
                "backbones": [
                    {
                        "name": "timm",
                        "model": "mobilenetv2_050",
                        "weights": str(mobilenet_file),
                        "model_kwargs": {"pad_type": "same"},
                    }
                ],
                "num_classes": 2,
            }
        )


def test_pretrained_offline_fails_fast_with_a_clear_message(engine):
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        engine.build({"backbones": [{"name": "timm", "model": "resnet18", "pretrained": True}], "num_classes": 2})
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "resnet18" in message and "weights" in message and "offline" in message


def test_pretrained_does_not_hang_when_the_network_hangs(engine, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that never answers (DNS or connect hanging) is an error, not a hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        with pytest.raises(WeightsError, match="weights"):
            engine.build({"backbones": [{"name": "timm", "model": "resnet18", "pretrained": True}], "num_classes": 2})
        assert time.monotonic() - start < 10
    finally:
        release.set()


def test_unknown_timm_model_suggests_a_close_match(engine):
    with pytest.raises(ConfigError, match=r"unknown timm model 'test_resnt' \(did you mean 'test_resnet'\?\)"):
        engine.build({"backbones": ["timm:test_resnt"], "num_classes": 2})


def test_timm_backbone_needs_a_model(engine):
    with pytest.raises(ConfigError, match="needs 'model'"):
        engine.build({"backbones": ["timm"], "num_classes": 2})


def test_data_config_overrides(engine):
    model = engine.build(
        {
            "backbones": [
                {
                    "name": "timm",
                    "model": "test_efficientnet",
                    "input_size": [40, 48],
                    "mean": [0.1, 0.2, 0.3],
                    "interpolation": "bilinear",
                }
            ],
            "num_classes": 2,
        }
    )
    config = model.branches[0].backbone.data_config
    assert config["input_size"] == (3, 40, 48)
    assert config["mean"] == (0.1, 0.2, 0.3)
    assert config["std"] == pytest.approx((0.229, 0.224, 0.225))  # timm's, not overridden
    assert config["interpolation"] == "bilinear"


def test_backbone_contract(engine):
    backbone = engine.build({"backbones": ["timm:test_resnet"], "num_classes": 2}).branches[0].backbone
    assert backbone.feature_dim == 96
    assert set(backbone.data_config) == {"input_size", "mean", "std", "interpolation"}
    assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, 96, 1, 1)  # a feature map


@pytest.mark.parametrize(
    "model, extra_final", [("test_resnet", False), ("test_convnext", False), ("test_efficientnet", True)]
)
def test_forward_stages_lists_each_stage_once(engine, model, extra_final):
    backbone = engine.build({"backbones": [f"timm:{model}"], "num_classes": 2}).branches[0].backbone
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = backbone.forward_stages(x)
        final = backbone(x)
    # one entry per timm feature stage, plus the final features when a head conv makes them differ
    assert len(stages) == len(backbone.model.feature_info) + int(extra_final)
    assert stages[-1].shape[1] == backbone.feature_dim
    torch.testing.assert_close(stages[-1], final)
    assert all(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(stages, stages[1:]))


def test_vit_tokens_and_prefix(engine):
    backbone = (
        engine.build(
            {
                "backbones": [
                    {"name": "timm", "model": "test_vit", "model_kwargs": {"img_size": 32}, "input_size": 32}
                ],
                "num_classes": 2,
            }
        )
        .branches[0]
        .backbone
    )
    assert backbone.num_prefix_tokens == 1
    assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, 5, 64)  # class token + 2x2 patches


# --- honest defaults: pretrained when weights can be had, random init named in one warning ----------------


def timm_branch(model="test_resnet", **options):
    return {"name": "timm", "model": model, "input_size": 32, **options}


def test_default_offline_falls_back_to_random_weights_and_names_every_random_branch(engine):
    config = {
        "backbones": [
            timm_branch(),
            timm_branch("test_efficientnet"),
            timm_branch("test_convnext", pretrained=False),  # random on purpose: not named
        ],
        "num_classes": 2,
    }
    with pytest.warns(RandomInitWarning) as caught:
        model = engine.build(config)
    assert len(caught) == 1  # one line for the whole model
    message = str(caught[0].message)
    assert "\n" not in message and message.startswith("2 of 3 branches RANDOMLY INITIALISED")
    assert "timm:test_resnet, timm:test_efficientnet." in message and "test_convnext" not in message
    assert "hub cannot be reached" in message and '"pretrained": false' in message
    assert caught[0].filename == __file__  # points at the caller's line
    sources = [b.backbone.pretrained_source for b in model.branches]
    assert sources == [None, None, None]
    assert model.branches[0].backbone.random_init_reason and model.branches[2].backbone.random_init_reason is None


def test_pretrained_false_is_random_on_purpose_without_a_warning(engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = engine.build({"backbones": [timm_branch(pretrained=False)], "num_classes": 2})
    assert model.branches[0].backbone.pretrained_source is None


def test_default_uses_the_weights_index(engine, shared_dir, mobilenet_file, monkeypatch):
    """``"model": "mobilenetv2_100"`` with a weights folder: the indexed weights, with their kwargs and data config."""
    monkeypatch.setenv("FUSION_ENGINE_WEIGHTS_DIR", str(shared_dir / "weights"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        model = engine.build({"backbones": ["timm:mobilenetv2_100", "timm:mobilenetv2_100"], "num_classes": 2})
    backbone = model.branches[0].backbone
    assert backbone.pretrained_source == f"index:{MOBILENET}"
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5)
    assert model.shared_backbone_groups() == [[0, 1]]  # the same fixed weights: one module
    normalised = (torch.rand(1, 3, 224, 224) - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            model.branches[0](normalised), reference_mobilenet(mobilenet_file)(normalised), atol=1e-5, rtol=0
        )


def test_random_branches_are_not_shared(engine):
    model = engine.build({"backbones": [timm_branch(), timm_branch()], "num_classes": 2})
    assert model.shared_backbone_groups() == []  # two random initialisations, not one


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding ``timm/test_resnet.r160_in1k`` (weights of a seeded random model)."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("test_resnet")  # with its classifier, as the hub stores it
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return source


def test_default_uses_weights_in_the_local_hub_cache_offline(engine, hub_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        model = engine.build({"backbones": [timm_branch()], "num_classes": 2})
    backbone = model.branches[0].backbone
    assert backbone.pretrained_source == "hub cache:timm/test_resnet.r160_in1k"
    expected = {k: v for k, v in hub_cache.state_dict().items() if not k.startswith("fc.")}
    got = backbone.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert "state_dict" not in backbone.model.pretrained_cfg  # no second copy of the tensors kept
    # explicit pretrained=True works offline from the cache too
    explicit = engine.build({"backbones": [timm_branch(pretrained=True)], "num_classes": 2})
    assert explicit.branches[0].backbone.pretrained_source == "hub cache:timm/test_resnet.r160_in1k"


def test_a_failed_download_falls_back_only_for_the_default(engine, monkeypatch):
    import timm

    import fusion_engine.builtins.timm_backbones as timm_backbones

    create = timm.create_model

    def no_download(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("connection reset")
        return create(*args, **kwargs)

    monkeypatch.setattr(timm_backbones, "_hub_answers", lambda: True)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.warns(RandomInitWarning, match=r"downloading them failed \(OSError: connection reset\)"):
        engine.build({"backbones": [timm_branch()], "num_classes": 2})
    with pytest.raises(WeightsError, match="downloading pretrained weights for timm model 'test_resnet' failed"):
        engine.build({"backbones": [timm_branch(pretrained=True)], "num_classes": 2})


def test_a_saved_model_loads_without_fetching_or_warning(engine, tmp_path, monkeypatch):
    import fusion_engine.builtins.timm_backbones as timm_backbones

    model = engine.build({"backbones": [timm_branch()]}, class_names=["a", "b"])
    model.save(tmp_path / "run")

    def no_fetching(*args, **kwargs):
        raise AssertionError("loading a saved model looked for pretrained weights")

    monkeypatch.setattr(timm_backbones, "_indexed_weights_for", no_fetching)
    monkeypatch.setattr(timm_backbones, "_hub_answers", no_fetching)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        loaded = engine.load(tmp_path / "run")
    assert loaded.class_names == ["a", "b"]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), model.eval()(images))


def test_num_classes_of_the_config_must_match_the_class_names(engine):
    config = {"backbones": [timm_branch(pretrained=False)], "num_classes": 5}
    with pytest.raises(ConfigError, match=r"the config says num_classes: 5, but the data has 10 classes"):
        engine.build(config, class_names=[str(i) for i in range(10)])


def test_class_count_mismatch_says_how_to_build_for_the_data(engine):
    from fusion_engine import DataError

    model = engine.build({"backbones": [timm_branch(pretrained=False)]}, num_classes=3)
    with pytest.raises(DataError) as info:
        model.fit("digits", epochs=1, progress=False, log=lambda *a, **k: None)
    message = str(info.value)
    assert "the data has 10 classes but the model was built for 3" in message
    assert "class_names=['0', '1', '2', ..., '9']" in message and "num_classes=10" in message
    assert "leave num_classes out" not in message
