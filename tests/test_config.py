"""Config parsing and validation: every mistake a user can make is a ConfigError that says what to do."""

from __future__ import annotations

import json

import pytest

from fusion_engine import ConfigError, Engine, FusedModelConfig, parse_config


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins(entry_points=False)


def backbones(*models):
    return [{"name": "timm", "model": m, "input_size": 32} for m in models]


# --- unknown names and options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, where, wrong, close, valid",
    [
        ({"backbones": [{"name": "tim", "model": "test_resnet"}]}, "backbones[0]", "backbone 'tim'", "timm", ["timm"]),
        (
            {"backbones": [{"name": "timm", "model": "test_resnet", "extractor": "gme"}]},
            "backbones[0].extractor",
            "extractor 'gme'",
            "gem",
            ["avg", "avgmax", "gem", "max", "multiscale", "token"],
        ),
        (
            {"backbones": ["timm:test_resnet"], "fusion": "atention"},
            "fusion",
            "fusion 'atention'",
            "attention",
            ["attention", "concat", "gated", "stacking", "vote"],
        ),
    ],
)
def test_unknown_component_suggests_a_close_match_and_lists_valid_names(engine, config, where, wrong, close, valid):
    with pytest.raises(ConfigError) as info:
        engine.validate(config)
    message = str(info.value)
    assert message.startswith(f"{where}: unknown {wrong} (did you mean '{close}'?)")
    assert ", ".join(valid) in message


def test_unknown_name_without_a_close_match_still_lists_valid_names(engine):
    with pytest.raises(ConfigError) as info:
        engine.validate({"backbones": ["timm:test_resnet"], "fusion": "zzzzzz"})
    assert "did you mean" not in str(info.value)
    assert "Valid fusions: attention, concat, gated, stacking, vote" in str(info.value)


def test_unknown_option_suggests_a_close_match(engine):
    with pytest.raises(ConfigError) as info:
        engine.validate({"backbones": ["timm:test_resnet"], "fusion": {"name": "attention", "dimm": 64}})
    message = str(info.value)
    assert "fusion: fusion 'attention': unknown option 'dimm' (did you mean 'dim'?)" in message
    assert "Valid options: dim, heads, layers, dropout, activation" in message


def test_unknown_backbone_option_names_the_branch(engine):
    with pytest.raises(
        ConfigError,
        match=r"backbones\[1\]: backbone 'timm': unknown option 'pretrainde' "
        r"\(did you mean 'pretrained'\?\)",
    ):
        engine.validate({"backbones": ["timm:test_resnet", {"name": "timm", "model": "test_vit", "pretrainde": True}]})


@pytest.mark.parametrize(
    "fusion, option",
    [
        ({"name": "attention", "dim": "wide"}, "dim"),
        ({"name": "concat", "activation": "swish"}, "activation"),
        ({"name": "vote", "weights": "equal"}, "weights"),
    ],
)
def test_wrong_option_type_is_a_config_error(engine, fusion, option):
    with pytest.raises(ConfigError, match=rf"fusion '{fusion['name']}': option '{option}'"):
        engine.validate({"backbones": ["timm:test_resnet"], "fusion": fusion})


def test_wrong_extractor_option_type(engine):
    with pytest.raises(ConfigError, match=r"backbones\[0\]\.extractor: extractor 'gem': option 'p'"):
        engine.validate(
            {"backbones": [{"name": "timm", "model": "test_resnet", "extractor": {"name": "gem", "p": "x"}}]}
        )


def test_option_value_rejected_by_the_factory_is_a_config_error(engine):
    with pytest.raises(ConfigError, match=r"fusion: fusion 'attention': dim must be a positive multiple of heads"):
        engine.build(
            {
                "backbones": backbones("test_resnet"),
                "fusion": {"name": "attention", "dim": 30, "heads": 4},
                "num_classes": 2,
            }
        )


def test_validate_fills_in_defaults(engine):
    config = engine.validate({"backbones": ["timm:test_resnet"], "fusion": {"name": "gated", "dim": 32}})
    assert config.fusion.options == {"dim": 32, "dropout": 0.2, "activation": "gelu"}
    assert config.backbones[0].extractor.name == "avg"
    assert config.backbones[0].options["pretrained"] is None  # pretrained when weights can be had
    assert config.backbones[0].options["model"] == "test_resnet"


# --- structure of the config ----------------------------------------------------------------------------


def test_empty_backbones(engine):
    with pytest.raises(ConfigError, match=r"key .backbones.: List should have at least 1 item"):
        engine.validate({"backbones": []})
    with pytest.raises(ConfigError, match=r"key .backbones. is required"):
        parse_config({"fusion": "concat"})


def test_unknown_top_level_key():
    with pytest.raises(
        ConfigError,
        match=r"unknown key .classes. \(did you mean .num_classes.\?\)\. Valid keys: backbones, fusion, num_classes",
    ):
        parse_config({"backbones": ["timm:test_resnet"], "classes": 3})


def test_backbone_dict_without_name():
    with pytest.raises(ConfigError, match=r"a backbone needs a 'name'"):
        parse_config({"backbones": [{"model": "test_resnet"}]})


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_num_classes_below_two(engine, num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        parse_config({"backbones": ["timm:test_resnet"], "num_classes": num_classes})
    with pytest.raises(ConfigError, match="num_classes"):
        engine.build({"backbones": backbones("test_resnet")}, num_classes=num_classes)


def test_num_classes_missing_at_build(engine):
    config = {"backbones": backbones("test_resnet")}
    engine.validate(config)  # fine without it
    with pytest.raises(ConfigError, match=r"num_classes is missing"):
        engine.build(config)
    assert engine.build(config, num_classes=3).num_classes == 3
    model = engine.build(config, class_names=["cat", "dog"])
    assert (model.num_classes, model.class_names) == (2, ["cat", "dog"])
    with pytest.raises(ConfigError, match="class names"):
        engine.build({**config, "num_classes": 3}, num_classes=3, class_names=["cat", "dog"])


# --- equivalent forms -----------------------------------------------------------------------------------


def test_shorthand_and_dict_forms_parse_to_the_same_canonical_config(engine):
    forms = [
        {"backbones": ["timm:test_resnet"], "fusion": "concat"},
        {"backbones": [{"name": "timm", "model": "test_resnet"}], "fusion": {"name": "concat"}},
        {"backbones": [{"name": "timm", "model": "test_resnet", "extractor": "avg"}]},
        {
            "backbones": [
                {"name": "timm", "options": {"model": "test_resnet"}, "extractor": {"name": "avg"}, "freeze": True}
            ],
            "fusion": {"name": "concat", "options": {}},
        },
    ]
    parsed = [parse_config(f).model_dump() for f in forms]
    assert all(p == parsed[0] for p in parsed)
    assert parsed[0]["backbones"][0] == {
        "name": "timm",
        "options": {"model": "test_resnet"},
        "extractor": {"name": "avg", "options": {}},
        "label": None,
        "freeze": True,
    }
    validated = [engine.validate(f).model_dump() for f in forms]
    assert all(v == validated[0] for v in validated)
    # the canonical form reads back unchanged
    assert engine.validate(validated[0]).model_dump() == validated[0]


def test_engine_keys_and_options_are_separated():
    spec = parse_config(
        {
            "backbones": [
                {
                    "name": "timm",
                    "model": "test_vit",
                    "label": "vit",
                    "freeze": False,
                    "extractor": {"name": "token", "token": "mean"},
                    "input_size": 64,
                }
            ]
        }
    ).backbones[0]
    assert (spec.label, spec.freeze) == ("vit", False)
    assert spec.options == {"model": "test_vit", "input_size": 64}
    assert (spec.extractor.name, spec.extractor.options) == ("token", {"token": "mean"})


def test_a_name_alone_has_no_options():
    assert parse_config({"backbones": ["timm"]}).backbones[0].options == {}


# --- files ------------------------------------------------------------------------------------------------

CONFIG = {
    "backbones": ["timm:test_resnet", {"name": "timm", "model": "test_vit", "extractor": "token"}],
    "fusion": {"name": "attention", "dim": 64},
    "num_classes": 5,
}

YAML = """\
backbones:
  - timm:test_resnet
  - name: timm
    model: test_vit
    extractor: token
fusion:
  name: attention
  dim: 64
num_classes: 5
"""


def test_json_and_yaml_files_load_to_the_same_config(tmp_path, engine):
    json_path = tmp_path / "model.json"
    json_path.write_text(json.dumps(CONFIG))
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(YAML)
    expected = parse_config(CONFIG)
    assert parse_config(json_path) == expected
    assert parse_config(str(yaml_path)) == expected
    assert engine.validate(yaml_path).fusion.options["dim"] == 64


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '{"backbones": [', r"bad\.json is not valid JSON"),
        ("bad.yaml", "backbones: [unclosed", r"bad\.yaml is not valid YAML"),
        ("list.json", '["timm:test_resnet"]', r"a fused-model config is a dict"),
        ("empty.yaml", "", r"a fused-model config is a dict"),
    ],
)
def test_bad_config_files_are_config_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.json does not exist"):
        parse_config(tmp_path / "nope.json")


def test_config_of_the_wrong_type():
    with pytest.raises(ConfigError, match="not int"):
        parse_config(42)


# --- branch names ---------------------------------------------------------------------------------------


def test_branch_display_names_are_unique():
    config = parse_config(
        {
            "backbones": [
                "timm:test_resnet",
                "timm:test_vit",
                "timm:test_resnet",
                "timm:test_resnet",
                {"name": "timm", "weights": "/x/y/w.safetensors"},
            ]
        }
    )
    assert config.branch_names() == [
        "timm:test_resnet",
        "timm:test_vit",
        "timm:test_resnet#2",
        "timm:test_resnet#3",
        "timm:w.safetensors",
    ]


def test_branch_names_stay_unique_when_a_label_looks_like_a_suffix():
    config = parse_config(
        {
            "backbones": [
                {"name": "timm", "label": "a"},
                {"name": "timm", "label": "a"},
                {"name": "timm", "label": "a#2"},
            ]
        }
    )
    names = config.branch_names()
    assert len(set(names)) == 3
    assert names[0] == "a" and names[2] == "a#2"


def test_built_model_uses_the_branch_names(engine):
    model = engine.build({"backbones": backbones("test_resnet", "test_resnet"), "num_classes": 2})
    assert model.branch_names == ["timm:test_resnet", "timm:test_resnet#2"]
    assert isinstance(model.config, FusedModelConfig)
