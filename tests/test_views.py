"""Feature views for frozen training: one cache entry per view, test-time flip averaging (by hand, after
saving and loading), the choice on validation, and the --views option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from four_digits import CLASSES, four_digits_dataset

import fusion_engine
from fusion_engine import ConfigError, Engine
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.views import ViewDataset, flip, shift, view_features, view_options

RESNET = {"name": "timm", "model": "test_resnet", "input_size": 32, "pretrained": False}
EFFNET = {"name": "timm", "model": "test_efficientnet", "input_size": 32, "pretrained": False}
QUIET = {"progress": False, "log": lambda *args, **kwargs: None}


@pytest.fixture(scope="module")
def data():
    return four_digits_dataset(120)


@pytest.fixture
def engine():
    return Engine.from_plugins()


def build(engine, **config):
    torch.manual_seed(0)
    return engine.build({"backbones": [RESNET, EFFNET], "fusion": "concat", **config}, class_names=CLASSES)


def test_views_change_images_as_named():
    image = torch.arange(2 * 4 * 8, dtype=torch.uint8).view(2, 4, 8)
    assert torch.equal(flip(image), torch.from_numpy(image.numpy()[..., ::-1].copy()))
    moved = shift(image)  # 1 px right and down (1/16 of the side, at least 1), edge repeated
    assert torch.equal(moved[:, 1:, 1:], image[:, :-1, :-1])
    assert torch.equal(moved[:, 0, 1:], image[:, 0, :-1])


def test_each_view_is_its_own_cache_entry(engine, data, tmp_path):
    model = build(engine)
    cache = FeatureCache(tmp_path)
    original = cache.features(model, data, progress=False)
    views = view_features(cache, model, data, ["flip", "shift"], progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 2 * 3  # 2 branches x (original, flip, shift)
    assert cache.stats["extracted"] == 6 and cache.stats["hits"] == 0
    assert not np.allclose(views["flip"][0], original[0])
    again = FeatureCache(tmp_path)
    second = view_features(again, model, data, ["flip"], progress=False)
    assert again.stats == {"hits": 2, "extracted": 0, "extract_seconds": 0.0}
    np.testing.assert_array_equal(second["flip"][1], views["flip"][1])
    assert ViewDataset(data, "flip").digest() != ViewDataset(data, "shift").digest() != data.digest()


def test_flip_averaged_prediction_is_the_head_on_the_mean_of_both_views_features(engine, data, tmp_path):
    model = build(engine, flip_average=True)
    model.fit(data, cache_dir=tmp_path, epochs=2, baselines=False, **QUIET)
    assert model.config.flip_average
    images = torch.stack([data[i][0] for i in range(8)]).float().div(255)
    cache = FeatureCache(tmp_path)
    subset = data.subset(range(8))
    original = cache.features(model, subset, progress=False)
    flipped = cache.features(model, ViewDataset(subset, "flip"), progress=False)
    model.eval()
    with torch.no_grad():
        by_hand = model.fusion([torch.from_numpy((a + b) / 2) for a, b in zip(original, flipped)])
        plain = model.fusion([torch.from_numpy(np.array(a)) for a in original])
        predicted = torch.log(torch.from_numpy(model.predict_proba(images)))
    torch.testing.assert_close(predicted, torch.log_softmax(by_hand, dim=1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.log_softmax(plain, dim=1), predicted, atol=1e-4)


def test_a_loaded_flip_averaging_model_predicts_as_before_saving(engine, data, tmp_path):
    model = build(engine)
    history = model.fit(data, cache_dir=tmp_path / "cache", epochs=2, baselines=False, flip_average=True, **QUIET)
    assert history["flip_average"] is True and model.config.flip_average
    images = torch.stack([data[i][0] for i in range(10)])
    before = model.predict_proba(images)
    model.save(tmp_path / "run")
    loaded = fusion_engine.load(tmp_path / "run")
    assert loaded.config.flip_average
    np.testing.assert_allclose(loaded.predict_proba(images), before, atol=1e-6)
    report = loaded.evaluate(data.subset(range(10)), cache=FeatureCache(tmp_path / "cache"), progress=False)
    np.testing.assert_allclose(report.probabilities, before, atol=1e-4)  # evaluate flip-averages too


def test_auto_tries_each_view_and_flip_averaging_and_keeps_the_best_on_validation(engine, data, tmp_path):
    model = build(engine)
    history = model.fit(
        data, cache_dir=tmp_path, epochs=2, baselines=False, feature_views="auto", flip_average="auto", **QUIET
    )
    scores = history["view_scores"]
    assert len(scores) == 4 * 2  # (none, flip, shift, both) x (flip-averaged or not)
    kept = " + ".join(["original", *history["views"]]) + (", flip-averaged" if history["flip_average"] else "")
    assert scores[kept] == max(scores.values()) == history["val_accuracy"]
    assert model.config.flip_average == history["flip_average"]


def test_stacking_trains_on_views_too(engine, data, tmp_path):
    model = engine.build({"backbones": [RESNET], "fusion": "stacking"}, class_names=CLASSES)
    history = model.fit(data, cache_dir=tmp_path, baselines=False, feature_views=["flip"], **QUIET)
    assert history["views"] == ["flip"] and model.fusion.fitted


def test_views_option():
    assert view_options(None) == {}
    assert view_options("auto") == {"feature_views": "auto", "flip_average": "auto"}
    assert view_options("flip, shift") == {"feature_views": ["flip", "shift"], "flip_average": False}
    assert view_options("flip-average") == {"feature_views": [], "flip_average": True}
    with pytest.raises(ConfigError, match="did you mean 'shift'"):
        view_options("flip,shfit")


def test_views_need_frozen_mode(engine, data):
    with pytest.raises(ConfigError, match="feature_views works on frozen features"):
        build(engine).fit(data, mode="finetune", feature_views=["flip"], **QUIET)


def test_train_views_flag_sets_the_training_options():
    from fusion_engine.cli.common import train_config_from
    from fusion_engine.cli.main import build_parser

    args = build_parser().parse_args(["train", "--data", "x", "--views", "shift,flip-average"])
    config = train_config_from(args)
    assert (config.feature_views, config.flip_average) == (["shift"], True)
    plain = train_config_from(build_parser().parse_args(["train", "--data", "x"]))
    assert (plain.feature_views, plain.flip_average) == ([], False)
