"""Top-block fine-tuning on cached trunk activations (issue #15, first item): the split reproduces the backbone, the
cached path gives the full model's features, training moves the top and not the trunk, the activation cache is
keyed by weights and K, the trained model saves, loads, exports and signs like any other, and what cannot be split
is refused with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits_dataset
from torch import nn

from fusion_engine import ConfigError, Engine, hookimpl, load
from fusion_engine.cli.main import main
from fusion_engine.core.loader import make_loader
from fusion_engine.training.config import train_config
from fusion_engine.training.evaluation import logits_from_features
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.top_blocks import TopBlocks

EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32, "pretrained": False}
RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}
QUIET = {"progress": False, "log": lambda *a, **k: None}


class Pixels(nn.Module):
    """A backbone without ``split``: grey pixels as a vector."""

    data_config = {
        "input_size": (3, 8, 8),
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "interpolation": "bilinear",
    }

    def forward(self, x):
        return x.mean(1).flatten(1)


class PixelsPlugin:
    @hookimpl
    def register_backbones(self, register):
        register("pixels", Pixels, description="grey pixels (test backbone)")


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins()


@pytest.fixture(scope="module")
def data():
    return four_digits_dataset(80)


def build(engine, backbones=(EFFNET, RESNET), fusion="concat"):
    torch.manual_seed(0)
    return engine.build({"backbones": list(backbones), "fusion": fusion}, class_names=CLASSES)


@pytest.mark.parametrize("spec", [EFFNET, RESNET], ids=["efficientnet", "resnet"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_split_reproduces_the_backbone(engine, spec, blocks):
    backbone = build(engine, [spec]).branches[0].backbone.eval()
    trunk, top = backbone.split(blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(top(trunk(x)), backbone(x))
    top_params = {id(p) for p in top.parameters()}
    assert top_params and top_params <= {id(p) for p in backbone.parameters()}  # the backbone's own modules
    assert not top_params & {id(p) for p in trunk.parameters()}


def test_cached_path_gives_the_full_models_logits(engine, data, tmp_path):
    model = build(engine).eval()
    top = TopBlocks(model, 1)
    inputs = top.inputs(FeatureCache(tmp_path), data, train_config(train_blocks=1), "cpu", progress=False)
    assert inputs[0].shape == (len(data), int(np.prod(top.tops[0].shape)))
    cached = logits_from_features(model.fusion, top.features(inputs, "cpu"))
    with torch.no_grad():
        full = torch.cat([model(images) for images, _ in make_loader(data, model, 32)]).numpy()
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-5)  # channels_last extraction vs NCHW


def test_training_moves_the_top_blocks_and_nothing_below(engine, data):
    model = build(engine)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = model.fit(data, train_blocks=1, epochs=3, lr=1e-2, backbone_lr=1e-2, use_cache=False, **QUIET)
    assert history["epochs"] and model.fitted
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    effnet, resnet = "branches.0.backbone.model.", "branches.1.backbone.model."
    assert any(k.startswith(effnet + "blocks.4.") for k in changed)  # the last stage
    assert any(k.startswith(effnet + "conv_head.") for k in changed)  # and the head conv after it
    assert any(k.startswith(resnet + "layer4.") for k in changed)
    assert any(k.startswith("fusion.") for k in changed)
    below = tuple(effnet + name for name in ("conv_stem", "bn1", "blocks.0", "blocks.3")) + (resnet + "layer3",)
    trunk = [k for k in before if k.startswith(below)]
    assert trunk and not changed & set(trunk)
    assert not {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert not any(p.requires_grad for b in model.branches for p in b.backbone.parameters())  # still frozen


def test_activation_cache_is_keyed_by_weights_and_k(engine, data, tmp_path):
    model = build(engine)
    config = train_config(train_blocks=1)
    one, two = TopBlocks(model, 1), TopBlocks(model, 2)
    digest = data.digest()
    key = one.keys(digest)[0]
    assert key != two.keys(digest)[0]
    cache = FeatureCache(tmp_path)
    one.inputs(cache, data, config, "cpu", progress=False)
    assert cache.stats == {**cache.stats, "hits": 0, "extracted": 2}
    one.inputs(cache, data, config, "cpu", progress=False)
    assert cache.stats["hits"] == 2 and cache.stats["extracted"] == 2
    two.inputs(cache, data, config, "cpu", progress=False)
    assert cache.stats["extracted"] == 4  # K=2: other activations, extracted again
    with torch.no_grad():
        model.branches[0].backbone.model.blocks[0][0].conv.weight.mul_(1.5)  # changed trunk weights
    assert TopBlocks(model, 1).keys(digest)[0] != key
    fresh = one.inputs(FeatureCache(enabled=False), data, config, "cpu", progress=False)[0]
    again = TopBlocks(model, 1).inputs(cache, data, config, "cpu", progress=False)[0]
    assert cache.stats["extracted"] == 5  # the changed branch only; the other one's entry still hits
    np.testing.assert_array_equal(again, fresh)  # the new weights' activations, not the stale entry


def test_frozen_branches_share_the_ordinary_feature_cache(register_plugin, data, tmp_path):
    """A branch that cannot be split stays frozen and reads the same entry a K=0 run writes."""
    register_plugin(PixelsPlugin())
    model = build(Engine.from_plugins(), [EFFNET, {"name": "pixels"}])
    config = train_config(train_blocks=1)
    FeatureCache(tmp_path).features(model, data, progress=False)
    top = TopBlocks(model, 1)
    assert top.frozen == [1]
    cache = FeatureCache(tmp_path)
    inputs = top.inputs(cache, data, config, "cpu", progress=False)
    assert cache.stats["hits"] == 1 and cache.stats["extracted"] == 1  # pixels hit, activations extracted
    assert inputs[1].shape == (len(data), model.branches[1].feature_dim)


@pytest.mark.parametrize(
    "fusion, flags", [("concat", []), ("vote", ["--independent-branches"])], ids=["joint", "independent"]
)
def test_trained_model_saves_loads_exports_and_signs(engine, data, tmp_path, fusion, flags):
    from fusion_engine.artifacts.signing import generate_keypair

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"backbones": [EFFNET | {"input_size": 24}, RESNET], "fusion": fusion}))
    private, public = generate_keypair(tmp_path / "signing.pem")
    run = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", "digits", "--train-blocks", "1", "--epochs", "2", *flags]
    args += ["--views", "flip,flip-average", "--no-cache", "--no-baselines", "--out", str(run)]
    assert main([*args, "--sign-key", str(private), "-q"]) == 0
    model = load(run, public_key=public)
    assert model.history["config"]["train_blocks"] == 1 and model.config.flip_average  # kept by save and load
    assert model.history["config"]["independent_branches"] == bool(flags)
    images = torch.rand(6, 3, 24, 24)
    torch.testing.assert_close(load(run).predict_proba(images), model.predict_proba(images))
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0  # parity checked
    assert main(["compress", str(run), "--method", "fp16", "--out", str(tmp_path / "small"), "-q"]) == 0
    np.testing.assert_allclose(load(tmp_path / "small").predict_proba(images), model.predict_proba(images), atol=2e-2)


def test_save_and_load_reproduce_the_trained_predictions(engine, data, tmp_path):
    model = build(engine)
    model.fit(data, train_blocks=2, epochs=2, use_cache=False, baselines=False, **QUIET)
    model.save(tmp_path / "run")
    images = torch.rand(5, 3, 32, 32)
    np.testing.assert_array_equal(load(tmp_path / "run").predict_proba(images), model.predict_proba(images))


def test_refusals_name_the_problem_and_the_fix(engine, data):
    vit = build(engine, [{"name": "timm", "model": "test_vit", "pretrained": False}])
    with pytest.raises(ConfigError, match=r"EfficientNet.*ResNet.*--train-blocks 0"):
        TopBlocks(vit, 1)
    with pytest.raises(ConfigError, match="has 5 stages; choose 0 to 5"):
        TopBlocks(build(engine, [EFFNET]), 6)
    with pytest.raises(ConfigError, match="fitted, not trained by gradient"):
        TopBlocks(build(engine, fusion="stacking"), 1)
    with pytest.raises(ConfigError, match="train_blocks.*unfreeze"):
        train_config(mode="finetune", train_blocks=1)
    with pytest.raises(ConfigError, match="drop --extract-runtime bf16"):
        TopBlocks(build(engine, [EFFNET]), 1).inputs(FeatureCache(runtime="bf16"), data, train_config(), "cpu")


def test_views_are_cached_apart_and_each_row_reads_its_drawn_view(engine, data, tmp_path):
    from fusion_engine.training.views import ViewDataset

    model = build(engine).eval()
    top = TopBlocks(model, 1)
    config = train_config(train_blocks=1, feature_views=["flip"])
    cache = FeatureCache(tmp_path)
    plain = top.inputs(cache, data, config, "cpu", progress=False)
    mirrored = top.inputs(cache, ViewDataset(data, "flip"), config, "cpu", progress=False)
    assert cache.stats["extracted"] == 4 and cache.stats["hits"] == 0  # one entry per branch and view
    assert not np.allclose(plain[0], mirrored[0])
    rows, choice = np.arange(6), np.array([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        mixed = top.branch_features(plain, rows, "cpu", views=[mirrored], choice=choice)
        from_plain = top.branch_features(plain, rows, "cpu")
        from_mirrored = top.branch_features(mirrored, rows, "cpu")
    for i in range(len(model.branches)):
        expected = torch.where(torch.from_numpy(choice == 1)[:, None], from_mirrored[i], from_plain[i])
        torch.testing.assert_close(mixed[i], expected)


def test_fit_trains_the_tops_on_the_views_it_is_given(engine, data, tmp_path):
    model = build(engine)
    history = model.fit(data, train_blocks=1, feature_views=["flip"], epochs=2, cache_dir=tmp_path, **QUIET)
    assert history["views"] == ["flip"] and len(history["epochs"]) == 2
    assert history["cache"]["extracted"] == 6  # train, validation and the mirrored training images, two branches


def test_flip_average_with_top_blocks_scores_validation_as_the_model_predicts(engine, data, tmp_path):
    from fusion_engine.core.data import stratified_split

    model = build(engine)
    history = model.fit(data, train_blocks=1, flip_average=True, epochs=2, cache_dir=tmp_path, **QUIET)
    assert history["flip_average"] and model.config.flip_average
    assert history["cache"]["extracted"] == 6  # train, validation and the mirrored validation images, two branches
    _, val = stratified_split(data, 0.15, 0)  # fit()'s validation split
    images = torch.stack([torch.as_tensor(val[i][0]) for i in range(len(val))])
    assert history["val_accuracy"] == pytest.approx(
        float((model.predict_proba(images).argmax(1) == val.targets).mean())
    )
    pixels = torch.rand(6, 3, 32, 32)  # at the model's input size: what predict_proba feeds the branches
    with torch.no_grad():
        plain, flipped = model.branch_features(pixels), model.branch_features(pixels.flip(-1))
        expected = torch.softmax(model.fusion([(a + b) / 2 for a, b in zip(plain, flipped)]), 1).numpy()
        unaveraged = torch.softmax(model.fusion(plain), 1).numpy()
    np.testing.assert_allclose(model.predict_proba(pixels), expected, atol=1e-5)
    assert not np.allclose(unaveraged, expected, atol=1e-4)


def test_views_with_top_blocks_must_be_named(engine):
    for field in ("feature_views", "flip_average"):
        with pytest.raises(ConfigError, match=rf"name the views.*--views flip,flip-average.*{field}='auto'"):
            train_config(train_blocks=1, **{field: "auto"})


def vote_model(engine, backbones=(EFFNET, RESNET)):
    torch.manual_seed(0)
    fusion = {"name": "vote", "dropout": 0.0}  # no dropout: training draws no random numbers per branch
    return engine.build({"backbones": list(backbones), "fusion": fusion}, class_names=CLASSES)


def test_independent_branches_train_each_as_if_alone(engine, data):
    """With independent branches, a branch's top and head end exactly where training that branch alone takes them;
    joint training through the fused prediction takes them elsewhere."""
    runs = {}
    for independent in (True, False):
        pair = vote_model(engine)
        alone = vote_model(engine, [EFFNET])
        alone.branches[0].backbone.load_state_dict(pair.branches[0].backbone.state_dict())
        alone.fusion.branch_heads[0].load_state_dict(pair.fusion.branch_heads[0].state_dict())
        options = dict(train_blocks=1, independent_branches=independent, epochs=3, lr=1e-2, backbone_lr=1e-2)
        for model in (pair, alone):
            model.fit(data, use_cache=False, baselines=False, **options, **QUIET)
        runs[independent] = [
            (a, b)
            for model_a, model_b in [(pair.branches[0].backbone, alone.branches[0].backbone)]
            + [(pair.fusion.branch_heads[0], alone.fusion.branch_heads[0])]
            for a, b in zip(model_a.parameters(), model_b.parameters())
        ]
    for a, b in runs[True]:
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in runs[False])


def test_independent_branches_keep_each_ones_best_epoch(engine, data):
    from fusion_engine.core.data import stratified_split

    model = vote_model(engine)
    history = model.fit(
        data, train_blocks=1, independent_branches=True, epochs=4, lr=3e-2, use_cache=False, baselines=False, **QUIET
    )
    assert history["config"]["independent_branches"]
    _, val = stratified_split(data, 0.15, 0)  # fit()'s validation split
    model.eval()
    with torch.no_grad():
        features = [torch.cat(f) for f in zip(*(model.branch_features(x) for x, _ in make_loader(val, model, 64)))]
        for i, head in enumerate(model.fusion.branch_heads):
            accuracy = float((head(features[i]).argmax(1).numpy() == val.targets).mean())
            assert accuracy == pytest.approx(max(e["branch_val_accuracy"][i] for e in history["epochs"]), abs=1e-4)


def test_independent_branches_refusals_name_the_fix(engine):
    with pytest.raises(ConfigError, match=r"one head over all branches.*\(vote\).*--independent-branches"):
        TopBlocks(build(engine), 1, independent=True)
    shared = vote_model(engine, [EFFNET, EFFNET])
    shared.share_backbones([[0, 1]])
    with pytest.raises(ConfigError, match="share one backbone.*own backbone"):
        TopBlocks(shared, 1, independent=True)
    with pytest.raises(ConfigError, match="set train_blocks too.*--train-blocks 2 --independent-branches"):
        train_config(independent_branches=True)
