"""The branches' input size follows the data (core.input_size): small images get a capped input size,
an explicit input_size always wins, and fusion-engine train applies the rule."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_engine import Engine
from fusion_engine.core.data import load_dataset
from fusion_engine.core.input_size import UPSCALE, image_side, max_input_size, sized_to_data
from fusion_engine.core.network import input_size_for


def images(side: int, n: int = 12) -> object:
    x = np.random.default_rng(0).integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    return load_dataset((x, np.arange(n) % 2))


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins(entry_points=False)


def test_the_cap_is_a_multiple_of_the_image_side_rounded_up_to_a_stride():
    assert max_input_size(32) == 32 * UPSCALE == 160
    assert max_input_size(16) == 96 and max_input_size(8) == 64  # 80 and 40 rounded up to a multiple of 32
    assert image_side(images(20)) == 20


def test_small_images_cap_a_timm_branch_and_an_explicit_size_wins(engine):
    config = {
        "backbones": [
            {"name": "timm", "model": "mobilenetv2_050", "pretrained": False},  # its own size: 224
            {"name": "timm", "model": "mobilenetv2_050", "pretrained": False, "input_size": 192},
        ],
        "num_classes": 2,
    }
    sized = sized_to_data(config, images(32))
    assert sized["backbones"][0]["options"]["max_input_size"] == 160
    assert "max_input_size" not in sized["backbones"][1]["options"]
    model = engine.build(sized)
    assert [b.backbone.data_config["input_size"][-1] for b in model.branches] == [160, 192]
    assert input_size_for(model) == (192, 192)


def test_large_images_leave_the_model_s_own_size(engine):
    config = {"backbones": [{"name": "timm", "model": "mobilenetv2_050", "pretrained": False}], "num_classes": 2}
    model = engine.build(sized_to_data(config, images(64)))  # cap 320 > 224: the model's own size stays
    assert model.branches[0].backbone.data_config["input_size"][-1] == 224
    assert model.branches[0].backbone.rebuild_options["input_size"] == [224, 224]


def test_train_sizes_branches_to_the_data(tmp_path):
    import json

    from fusion_engine.cli.main import main

    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(40) % 2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"backbones": [{"name": "timm", "model": "test_resnet", "pretrained": False}]}))
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(tmp_path / "small.npz"), "--no-cache", "--epochs", "1"]
    assert main([*args, "-q", "--no-baselines", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["backbones"][0]["options"]["input_size"] == [64, 64]  # 8 px images: 160 capped at 64


def test_the_estimator_sizes_branches_to_array_images():
    from fusion_engine.sklearn import FusionClassifier

    config = {"backbones": [{"name": "timm", "model": "test_resnet", "pretrained": False}]}
    x = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
    est = FusionClassifier(config, epochs=1, use_cache=False, baselines=False).fit(x, np.arange(20) % 2)
    assert est.model_.branches[0].backbone.data_config["input_size"][-1] == 64


def test_the_cap_applies_to_the_size_a_weights_index_entry_gives():
    from fusion_engine.core.weights_index import all_entries

    name = "mobilenetv1_075.tf1_quant_in1k"  # shipped by fusion-engine-weights at 192 px
    if name not in all_entries():
        pytest.skip("fusion-engine-weights is not installed (pip install ./plugins/fusion-engine-weights)")
    config = {"backbones": [{"name": "timm", "weights": name}], "num_classes": 2}
    model = Engine.from_plugins().build(sized_to_data(config, images(32)))
    assert model.branches[0].backbone.data_config["input_size"][-2:] == (160, 160)
    model = Engine.from_plugins().build(sized_to_data(config, images(48)))  # cap 256: the entry's 192 stays
    assert model.branches[0].backbone.data_config["input_size"][-2:] == (192, 192)


def test_search_candidates_are_sized_to_the_data(engine, tmp_path):
    from fusion_engine.search.run import search

    own = {"name": "timm", "model": "test_efficientnet", "pretrained": False, "label": "own"}
    fixed = {**own, "input_size": 48, "label": "fixed"}
    result = search(
        images(16, n=40),  # 16 px images: cap 96
        [own, fixed],
        engine=engine,
        fusions=["concat"],
        cache_dir=tmp_path,
        log=lambda *a: None,
        folds=2,
        epochs=1,
        max_branches=1,
        baseline=False,
        held_out=False,
    )
    sizes = {c.label: c.model.branches[0].backbone.data_config["input_size"][-1] for c in result.candidates}
    assert sizes == {"own": 96, "fixed": 48}
    assert result.candidates[0].spec["options"]["max_input_size"] == 96  # the winner's config reproduces it
