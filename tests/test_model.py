"""FusedClassifier on tiny timm backbones: every extractor x every fusion, gradients, fitting, inputs, preprocessing."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_engine import ConfigError, Engine

EXTRACTORS = ["avg", "max", "avgmax", "gem", "multiscale", "token"]
BUILTIN_FUSIONS = ["concat", "attention", "gated", "vote", "stacking"]
HAS_BILINEAR = bool(importlib.metadata.entry_points(group="fusion_engine", name="bilinear"))
FUSIONS = BUILTIN_FUSIONS + (["bilinear"] if HAS_BILINEAR else [])

RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32}  # 96 features; stages 32, 32, 48, 192, 96
EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32}  # 256 features
VIT = {"name": "timm", "model": "test_vit", "model_kwargs": {"img_size": 32}, "input_size": 32}  # 64 wide, 1 cls token

# feature width of each extractor on each backbone (multiscale: the last 3 distinct stages)
RESNET_DIMS = {"avg": 96, "max": 96, "gem": 96, "avgmax": 192, "multiscale": 48 + 192 + 96}
VIT_DIMS = {"avg": 64, "max": 64, "gem": 64, "avgmax": 128, "multiscale": 3 * 64, "token": 64}


@pytest.fixture
def engine():
    return Engine.from_plugins()


def extractor_spec(name):
    return {"name": "gem", "learnable": True} if name == "gem" else name


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("extractor", EXTRACTORS)
def test_every_extractor_with_every_fusion(engine, extractor, fusion):
    torch.manual_seed(0)
    conv_extractor = "avg" if extractor == "token" else extractor  # 'token' needs a transformer
    model = engine.build(
        {
            "backbones": [
                {**RESNET, "extractor": extractor_spec(conv_extractor)},  # frozen (the default)
                {**VIT, "extractor": extractor_spec(extractor), "freeze": False},
            ],
            "fusion": fusion,
            "num_classes": 3,
        }
    )
    resnet, vit = model.branches
    assert [resnet.feature_dim, vit.feature_dim] == [RESNET_DIMS[conv_extractor], VIT_DIMS[extractor]]

    model.train()
    assert not resnet.backbone.training and vit.backbone.training
    images = torch.rand(4, 3, 28, 36)
    features = model.branch_features(images)
    assert [tuple(f.shape) for f in features] == [(4, resnet.feature_dim), (4, vit.feature_dim)]
    logits = model.fusion(features)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()

    fusion_grads = [p.grad for p in trainable(model.fusion)]
    assert fusion_grads and any(g is not None and g.abs().sum() > 0 for g in fusion_grads)
    assert all(not p.requires_grad and p.grad is None for p in resnet.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.backbone.parameters())
    for branch in model.branches:  # learnable extractor parameters train, frozen backbone or not
        for p in trainable(branch.extractor):
            assert p.grad is not None

    model.eval()
    with torch.no_grad():
        one = model(torch.rand(1, 3, 20, 20))
    assert one.shape == (1, 3)


def test_gem_p_is_fixed_unless_learnable(engine):
    model = engine.build({"backbones": [{**RESNET, "extractor": {"name": "gem", "p": 2.0}}], "num_classes": 2})
    assert trainable(model.branches[0].extractor) == []
    assert model.branches[0].extractor.p.item() == 2.0


def test_token_extractor_on_a_cnn_is_a_config_error(engine):
    with pytest.raises(ConfigError, match="no class token"):
        engine.build({"backbones": [{**RESNET, "extractor": "token"}], "num_classes": 2})


# --- fusion specifics ------------------------------------------------------------------------------


def three_branch(engine, fusion, **options):
    return engine.build(
        {
            "backbones": [RESNET, EFFNET, {**VIT, "extractor": "token"}],
            "fusion": {"name": fusion, **options},
            "num_classes": 4,
        }
    )


def test_attention_exposes_per_sample_branch_weights(engine):
    model = three_branch(engine, "attention", dim=32, heads=2).eval()
    with torch.no_grad():
        model(torch.rand(5, 3, 32, 32))
    weights = model.fusion.last_weights
    assert weights.shape == (5, 3)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(5))


def test_gated_exposes_per_sample_gates(engine):
    model = three_branch(engine, "gated", dim=16).eval()
    with torch.no_grad():
        model(torch.rand(5, 3, 32, 32))
    gates = model.fusion.last_gates
    assert gates.shape == (5, 3)
    assert ((gates > 0) & (gates < 1)).all()


def test_vote_with_fixed_weights(engine):
    model = engine.build(
        {"backbones": [RESNET, EFFNET], "fusion": {"name": "vote", "weights": [1, 3]}, "num_classes": 3}
    )
    torch.testing.assert_close(model.fusion.branch_weights(), torch.tensor([0.25, 0.75]))
    assert not model.fusion.log_weights.requires_grad
    probs = torch.exp(model.eval()(torch.rand(2, 3, 32, 32)))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, -1.0]])
def test_vote_with_wrong_fixed_weights_is_a_config_error(engine, weights):
    with pytest.raises(ConfigError, match=r"fusion: fusion 'vote': weights must be 2 positive numbers"):
        engine.build({"backbones": [RESNET, EFFNET], "fusion": {"name": "vote", "weights": weights}, "num_classes": 3})


def colour_images(n, seed, size=24):
    """Class c: channel c bright. Separable by colour, with noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    images = rng.uniform(0, 0.4, size=(n, size, size, 3))
    images[np.arange(n), :, :, y] += 0.6
    return (images * 255).round().astype(np.uint8), y


def test_stacking_fits_beats_chance_and_stays_a_tensor_module(engine):
    model = engine.build({"backbones": [RESNET, EFFNET], "fusion": {"name": "stacking", "folds": 3}, "num_classes": 3})
    assert getattr(model.fusion, "requires_fit", False) is True
    assert not bool(model.fusion.fitted)
    train, y = colour_images(60, seed=0)
    x = torch.from_numpy(train).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        features = [f.numpy() for f in model.eval().branch_features(x)]
    assert model.fusion.fit(features, y) is model.fusion
    assert bool(model.fusion.fitted)

    test, y_test = colour_images(30, seed=1)
    accuracy = (model.predict(test) == y_test).mean()
    assert accuracy >= 0.8, accuracy  # chance is 1/3

    state = model.fusion.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = engine.build({"backbones": [RESNET, EFFNET], "fusion": {"name": "stacking", "folds": 3}, "num_classes": 3})
    fresh.load_state_dict(model.state_dict())  # random-init backbones: carry them over too
    assert bool(fresh.fusion.fitted)
    np.testing.assert_allclose(fresh.predict_proba(test), model.predict_proba(test), atol=1e-6)


# --- inputs of predict / predict_proba ---------------------------------------------------------------


@pytest.fixture
def small_model(engine):
    torch.manual_seed(0)
    model = engine.build({"backbones": [RESNET, {**VIT, "extractor": "token"}], "fusion": "concat", "num_classes": 5})
    model.fitted = True  # untrained weights, but predict's input handling is what these tests check
    return model


def test_predict_proba_accepts_uint8_grey_and_float_inputs(small_model):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 20, 24, 3), dtype=np.uint8)
    as_float = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255

    p_uint8 = small_model.predict_proba(rgb)
    assert p_uint8.shape == (6, 5) and p_uint8.dtype == np.float32
    np.testing.assert_allclose(p_uint8.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(small_model.predict_proba(as_float), p_uint8, atol=1e-5)
    np.testing.assert_allclose(small_model.predict_proba(as_float, batch_size=4), p_uint8, atol=1e-5)
    np.testing.assert_array_equal(small_model.predict(rgb), p_uint8.argmax(axis=1))

    grey = rgb[..., 0]  # (N, H, W)
    p_grey = small_model.predict_proba(grey)
    assert p_grey.shape == (6, 5)
    np.testing.assert_allclose(p_grey, small_model.predict_proba(np.repeat(grey[..., None], 3, axis=-1)), atol=1e-5)
    assert small_model.predict(grey).shape == (6,)


def test_predict_proba_restores_training_mode(small_model):
    small_model.train()
    small_model.predict_proba(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert small_model.training and small_model.fusion.training
    assert not small_model.branches[0].backbone.training  # frozen: eval all along


# --- per-branch preprocessing --------------------------------------------------------------------------


def capture_backbone_inputs(model):
    seen = {}
    for i, branch in enumerate(model.branches):
        branch.backbone.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, args[0].clone()))
    return seen


def test_each_branch_gets_its_own_data_config(engine):
    odd = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    model = engine.build(
        {
            "backbones": [
                {**RESNET, **odd},  # 32 px, odd mean/std
                {**RESNET, "input_size": 48, "mean": [0.5] * 3, "std": [0.25] * 3},  # 48 px, other mean/std
                {**EFFNET, **odd},  # the same data config as branch 0
            ],
            "num_classes": 2,
        }
    ).eval()
    assert len(model.preprocessors) == 2
    assert model.preprocess_index == [0, 1, 0]
    seen = capture_backbone_inputs(model)

    with torch.no_grad():
        model(torch.full((2, 3, 40, 40), 0.6))
    assert seen[0].shape == (2, 3, 32, 32) and seen[1].shape == (2, 3, 48, 48)
    torch.testing.assert_close(seen[0][:, :, 5, 5], torch.tensor([[1.0, 0.8, 0.6]] * 2))  # (0.6 - mean) / std
    torch.testing.assert_close(seen[1][:, :, 5, 5], torch.tensor([[0.4, 0.4, 0.4]] * 2))
    torch.testing.assert_close(seen[2], seen[0])

    # at the backbone's own size there is no resampling: exactly (x - mean) / std
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen[0], (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5)


def test_branches_with_identical_data_configs_share_one_preprocessor(engine):
    model = engine.build({"backbones": [RESNET, {**RESNET, "extractor": "max"}, RESNET], "num_classes": 2})
    assert len(model.preprocessors) == 1 and model.preprocess_index == [0, 0, 0]


def test_grey_input_is_expanded_to_three_channels(engine):
    model = engine.build({"backbones": [RESNET], "num_classes": 2}).eval()
    seen = capture_backbone_inputs(model)
    grey = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out_grey = model(grey)
    assert seen[0].shape == (3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(out_grey, model(grey.expand(-1, 3, -1, -1)))


def test_frozen_backbones_stay_in_eval_mode_and_keep_batch_norm_statistics(engine):
    model = engine.build({"backbones": [RESNET, {**EFFNET, "freeze": False}], "num_classes": 2})
    model.train()
    frozen, tuned = model.branches
    assert model.training and not frozen.backbone.training and tuned.backbone.training
    assert all(not m.training for m in frozen.backbone.modules())
    bn = next(m for m in frozen.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    tuned_bn = next(m for m in tuned.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    tuned_before = tuned_bn.running_mean.clone()
    model(torch.rand(4, 3, 32, 32))
    torch.testing.assert_close(bn.running_mean, before)
    assert not torch.equal(tuned_bn.running_mean, tuned_before)
    model.eval()
    model.train(True)
    assert not frozen.backbone.training
