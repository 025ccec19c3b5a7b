"""Plugin discovery and registration: given plugins, entry points, env vars, failures, clashes."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_engine import Engine, PluginError, hookimpl
from fusion_engine.core.plugins import add_extra_plugins, extra_plugins, remove_extra_plugins
from fusion_engine.errors import ConfigError

BUILTIN_NAMES = {"timm_backbones", "extractors", "fusions"}  # fusion-engine's own entry points
TINY = {"name": "timm", "model": "test_resnet", "input_size": 32}


# --- a small plugin offering one component of each kind ---------------------------------------


class TinyBackbone(nn.Module):
    """Two strided convolutions; ``forward`` gives a (B, C, H, W) map, ``forward_stages`` both maps."""

    def __init__(self, size: int = 16, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, width, 3, stride=2, padding=1)
        self.feature_dim = width
        self.data_config = {
            "input_size": (3, size, size),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "interpolation": "bilinear",
        }

    def forward_stages(self, x):
        a = F.relu(self.conv1(x))
        return [a, F.relu(self.conv2(a))]

    def forward(self, x):
        return self.forward_stages(x)[-1]


class StageMax(nn.Module):
    """Extractor using every stage: per-stage global max, concatenated."""

    uses_stages = True

    def __init__(self, backbone):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, stages):
        return torch.cat([s.amax(dim=(2, 3)) for s in stages], dim=1) * self.scale


class MeanOfHeads(nn.Module):
    """Fusion: one linear head per branch, logits averaged."""

    def __init__(self, in_dims: list[int], num_classes: int, bias: bool = True):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes, bias=bias) for d in in_dims)

    def forward(self, features):
        return torch.stack([h(f) for h, f in zip(self.heads, features)]).mean(dim=0)


def tiny_backbone(size: int = 16, width: int = 6):
    return TinyBackbone(size, width)


class TinyPlugin:
    """Hook implementations as methods of an object, as a test would write them."""

    __version__ = "9.8.7"

    @hookimpl
    def register_backbones(self, register):
        register("tiny", tiny_backbone, description="Two convolutions\nmore text that is not the summary")

    @hookimpl
    def register_extractors(self, register):
        register("stage_max", StageMax, description="Max over every stage")

    @hookimpl
    def register_fusions(self, register):
        register("mean_of_heads", MeanOfHeads, description="Average of per-branch linear heads")


def fusion_plugin(class_name: str, fusion_name: str, factory=MeanOfHeads):
    """A distinct plugin class named ``class_name`` that registers one fusion."""

    def register_fusions(self, register):
        register(fusion_name, factory)

    return type(class_name, (), {"register_fusions": hookimpl(register_fusions)})()


# --- given plugins ----------------------------------------------------------------------------------


def test_given_plugin_adds_a_fusion_that_builds_and_runs():
    engine = Engine.from_plugins([TinyPlugin()], entry_points=False)
    fusion = engine.registry.get("fusion", "mean_of_heads")
    assert (fusion.plugin, fusion.version, fusion.description) == (
        "TinyPlugin",
        "9.8.7",
        "Average of per-branch linear heads",
    )
    info = next(p for p in engine.plugins if p.name == "TinyPlugin")
    assert (info.source, info.version) == ("given", "9.8.7")
    # entry_points=False: the built-ins only, no installed third-party plugin
    assert {p.name for p in engine.plugins} == BUILTIN_NAMES | {"TinyPlugin"}

    model = engine.build(
        {"backbones": [TINY, {**TINY, "extractor": "max"}], "fusion": "mean_of_heads", "num_classes": 3}
    )
    assert isinstance(model.fusion, MeanOfHeads)
    assert [h.in_features for h in model.fusion.heads] == [96, 96]
    logits = model(torch.rand(2, 3, 24, 24))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.fusion.heads[0].weight.grad is not None


def test_given_backbone_and_extractor_follow_the_contract():
    engine = Engine.from_plugins([TinyPlugin()], entry_points=False)
    model = engine.build(
        {
            "backbones": [
                {"name": "tiny", "size": 16, "width": 5, "extractor": "stage_max", "freeze": False},
                {"name": "tiny", "width": 7, "extractor": {"name": "multiscale", "stages": 2, "pool": "avgmax"}},
            ],
            "fusion": "concat",
            "num_classes": 4,
        }
    )
    # stage_max: 4 + 5 channels; built-in multiscale on the plugin's forward_stages: 2 * (4 + 7)
    assert [b.feature_dim for b in model.branches] == [9, 22]
    assert model.branch_names == ["tiny", "tiny#2"]
    assert model.branches[0].uses_stages and model.branches[1].uses_stages
    out = model(torch.rand(3, 1, 20, 20))  # grey, another size: preprocessing adapts
    assert out.shape == (3, 4)
    out.sum().backward()
    assert model.branches[0].backbone.conv1.weight.grad is not None  # trainable branch
    assert model.branches[0].extractor.scale.grad is not None
    assert model.branches[1].backbone.conv1.weight.grad is None  # frozen branch


def test_given_module_and_module_name(tmp_path, monkeypatch):
    module = types.ModuleType("fe_given_module")
    module.__version__ = "0.0.1"

    @hookimpl
    def register_fusions(register):
        register("from_module", MeanOfHeads)

    module.register_fusions = register_fusions
    engine = Engine.from_plugins([module], entry_points=False)
    assert engine.registry.get("fusion", "from_module").plugin == "fe_given_module"

    (tmp_path / "fe_importable_plugin.py").write_text(
        "from fusion_engine import hookimpl\n"
        "from fusion_engine.builtins.fusions import concat\n"
        "@hookimpl\n"
        "def register_fusions(register):\n"
        "    register('by_name', concat)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        engine = Engine.from_plugins(["fe_importable_plugin"], entry_points=False)
    finally:
        sys.modules.pop("fe_importable_plugin", None)
    assert engine.registry.get("fusion", "by_name").plugin == "fe_importable_plugin"


def test_given_module_name_that_does_not_import_raises():
    with pytest.raises(PluginError, match="fe_no_such_module"):
        Engine.from_plugins(["fe_no_such_module"], entry_points=False)


def test_register_plugin_fixture_registers_for_one_test_and_undoes(register_plugin, capsys):
    from fusion_engine import cli

    assert "mean_of_heads" not in Engine.from_plugins().registry.names("fusion")
    undo = register_plugin(TinyPlugin())
    engine = Engine.from_plugins()
    assert "mean_of_heads" in engine.registry.names("fusion")
    assert "tiny" in engine.registry.names("backbone")
    # the CLI, run in-process, sees it too
    assert cli.main(["list", "fusion", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"kind": "fusion", "name": "mean_of_heads", "plugin": "TinyPlugin"}.items() <= next(
        c for c in listed["components"] if c["name"] == "mean_of_heads"
    ).items()
    undo()
    assert "mean_of_heads" not in Engine.from_plugins().registry.names("fusion")


def test_extra_plugins_load_in_every_engine_as_given_until_removed():
    class Given:
        @hookimpl
        def register_fusions(self, register):
            register("given_concat", MeanOfHeads)

    tiny = TinyPlugin()
    add_extra_plugins(tiny)
    try:
        assert extra_plugins() == [tiny]
        for engine in (Engine.from_plugins(), Engine.from_plugins(entry_points=False)):
            assert engine.registry.get("fusion", "mean_of_heads").plugin == "TinyPlugin"
        engine = Engine.from_plugins([Given()], entry_points=False)
        # after the entry points (built-ins here), before the plugins given to the call; source "given"
        assert [(p.name, p.source) for p in engine.plugins][len(BUILTIN_NAMES) :] == [
            ("TinyPlugin", "given"),
            ("Given", "given"),
        ]
        add_extra_plugins(tiny)  # twice: needs two removals, loads once
        assert [p.name for p in Engine.from_plugins().plugins].count("TinyPlugin") == 1
        remove_extra_plugins(tiny)
        assert extra_plugins() == [tiny]
    finally:
        remove_extra_plugins(tiny)
    assert extra_plugins() == []
    assert "mean_of_heads" not in Engine.from_plugins().registry.names("fusion")
    remove_extra_plugins(tiny)  # not there: ignored


def test_given_plugin_failures_raise_naming_the_plugin():
    class BadName:
        @hookimpl
        def register_fusions(self, register):
            register("has:colon", MeanOfHeads)

    class NotCallable:
        @hookimpl
        def register_extractors(self, register):
            register("nothing", 42)

    with pytest.raises(PluginError, match=r"BadName.*has:colon"):
        Engine.from_plugins([BadName()], entry_points=False)
    with pytest.raises(PluginError, match=r"NotCallable.*factory must be callable"):
        Engine.from_plugins([NotCallable()], entry_points=False)


def test_blank_description_is_allowed():
    class Blank:
        @hookimpl
        def register_fusions(self, register):
            register("blank", MeanOfHeads, description="   \n")

    assert Engine.from_plugins([Blank()], entry_points=False).registry.get("fusion", "blank").description == ""


# --- option schemas from the factories' signatures -------------------------------------------------


def typed_fusion(
    in_dims: list[int], num_classes: int, dim: int = 4, mode: Literal["sum", "max"] = "sum", scale: float | None = None
):
    return MeanOfHeads(in_dims, num_classes)


def loose_fusion(in_dims, num_classes, **options):
    return MeanOfHeads(in_dims, num_classes)


class ClassFusion(MeanOfHeads):
    def __init__(self, in_dims: list[int], num_classes: int, width: int = 3):
        super().__init__(in_dims, num_classes)


class SchemaPlugin:
    @hookimpl
    def register_fusions(self, register):
        register("typed", typed_fusion)
        register("loose", loose_fusion)
        register("klass", ClassFusion)


def test_option_schema_comes_from_the_type_annotated_signature():
    engine = Engine.from_plugins([SchemaPlugin()], entry_points=False)
    typed = engine.registry.get("fusion", "typed")
    assert typed.validate_options({"dim": "8"}, "fusion") == {"dim": 8, "mode": "sum", "scale": None}
    assert typed.describe_options() == {
        "dim": "int = 4",
        "mode": "Literal['sum', 'max'] = 'sum'",
        "scale": "float | None = None",
    }
    with pytest.raises(ConfigError, match=r"option 'dim'.*'big'"):
        typed.validate_options({"dim": "big"}, "fusion")
    with pytest.raises(ConfigError, match=r"option 'mode'"):
        typed.validate_options({"mode": "mean"}, "fusion")
    with pytest.raises(
        ConfigError, match=r"unknown option 'dmi' \(did you mean 'dim'\?\).*Valid options: dim, mode, scale"
    ):
        typed.validate_options({"dmi": 3}, "fusion")
    # **options: anything goes
    assert engine.registry.get("fusion", "loose").validate_options({"whatever": 1}, "fusion") == {"whatever": 1}
    # a class as factory: the annotations of its __init__
    klass = engine.registry.get("fusion", "klass")
    assert klass.describe_options() == {"width": "int = 3"}
    with pytest.raises(ConfigError, match="width"):
        klass.validate_options({"width": "wide"}, "fusion")


# --- name clashes -----------------------------------------------------------------------------------


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    with pytest.raises(PluginError) as info:
        Engine.from_plugins(
            [fusion_plugin("FirstPlugin", "same"), fusion_plugin("SecondPlugin", "same")], entry_points=False
        )
    message = str(info.value)
    assert "fusion 'same'" in message and "FirstPlugin" in message and "SecondPlugin" in message


def test_clash_with_a_builtin_names_the_builtin_plugin():
    with pytest.raises(PluginError, match=r"fusion 'concat'.*'fusions'.*'Shadow'"):
        Engine.from_plugins([fusion_plugin("Shadow", "concat")], entry_points=False)


def test_two_objects_with_one_name_are_both_loaded():
    first, second = fusion_plugin("Twin", "first"), fusion_plugin("Twin", "second")
    engine = Engine.from_plugins([first, second], entry_points=False)
    assert {"first", "second"} <= set(engine.registry.names("fusion"))
    assert {p.name for p in engine.plugins} >= {"Twin", "Twin#2"}
    # the same object twice is one plugin
    engine = Engine.from_plugins([first, first], entry_points=False)
    assert [p.name for p in engine.plugins].count("Twin") == 1


# --- entry points of installed distributions ----------------------------------------------------------

GOOD_PLUGIN = """
from fusion_engine import hookimpl
from fusion_engine.builtins.fusions import concat

@hookimpl
def register_fusions(register):
    register("fake_concat", concat, description="Concat, from an installed distribution")
"""


def test_entry_point_plugin_is_found_with_its_distribution_version(fake_distribution):
    fake_distribution("fake-plugin", "1.2.3", GOOD_PLUGIN, module="fake_plugin_module", entry_point="fake_plugin")
    engine = Engine.from_plugins()
    info = next(p for p in engine.plugins if p.name == "fake_plugin")
    assert (info.source, info.version, info.distribution) == ("entry point", "1.2.3", "fake-plugin")
    component = engine.registry.get("fusion", "fake_concat")
    assert (component.plugin, component.version) == ("fake_plugin", "1.2.3")
    assert engine.failures == []
    model = engine.build({"backbones": [TINY], "fusion": "fake_concat", "num_classes": 2})
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 2)
    # not loaded when entry points are off
    assert "fake_concat" not in Engine.from_plugins(entry_points=False).registry.names("fusion")


def test_entry_point_plugin_that_fails_to_import_is_recorded(fake_distribution, monkeypatch):
    fake_distribution(
        "fake-broken", "1.2.3", "raise RuntimeError('boom: missing dependency')\n", entry_point="fake_broken"
    )
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert (failure.name, failure.version, failure.distribution) == ("fake_broken", "1.2.3", "fake-broken")
    assert failure.error == "RuntimeError: boom: missing dependency"
    assert "Traceback" in failure.details
    assert "fake_broken" not in {p.name for p in engine.plugins}
    # the engine still works
    assert engine.build({"backbones": [TINY], "num_classes": 2})(torch.rand(1, 3, 8, 8)).shape == (1, 2)

    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"fake_broken.*fake-broken 1\.2\.3.*boom: missing dependency"):
        Engine.from_plugins()

    # a disabled broken plugin is not even imported
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fake_broken")
    assert Engine.from_plugins().failures == []


def test_entry_point_plugin_with_a_misspelled_hook_is_a_failure(fake_distribution, monkeypatch):
    fake_distribution(
        "fake-typo",
        "0.3",
        """
        from fusion_engine import hookimpl

        @hookimpl
        def register_fusion(register):
            register("never", None)
        """,
        entry_point="fake_typo",
    )
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert failure.name == "fake_typo" and failure.version == "0.3"
    assert "register_fusion" in failure.error and "PluginValidationError" in failure.error
    assert "fake_typo" not in {p.name for p in engine.plugins}
    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"fake_typo.*register_fusion"):
        Engine.from_plugins()


def test_entry_point_plugin_whose_register_hook_raises_keeps_nothing(fake_distribution, monkeypatch):
    fake_distribution(
        "fake-halfway",
        "2.0",
        """
        from fusion_engine import hookimpl
        from fusion_engine.builtins.fusions import concat
        from fusion_engine.builtins.extractors import avg

        @hookimpl
        def register_extractors(register):
            register("halfway_avg", avg)

        @hookimpl
        def register_fusions(register):
            register("halfway_one", concat)
            raise KeyError("halfway")
        """,
        entry_point="fake_halfway",
    )
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert (failure.name, failure.version) == ("fake_halfway", "2.0")
    assert "KeyError" in failure.error and "halfway" in failure.error
    names = {c.name for c in engine.components()}
    assert "halfway_one" not in names and "halfway_avg" not in names
    assert "fake_halfway" not in {p.name for p in engine.plugins}
    assert {"concat", "avg", "timm"} <= names
    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"fake_halfway.*halfway"):
        Engine.from_plugins()


def test_allow_and_deny_lists_match_entry_point_or_distribution_name(fake_distribution, monkeypatch):
    fake_distribution("fake-plugin", "1.2.3", GOOD_PLUGIN, entry_point="fake_plugin")
    monkeypatch.setenv("FUSION_ENGINE_LOAD_PLUGINS", "fake-plugin")  # by distribution name
    assert {p.name for p in Engine.from_plugins().plugins} == BUILTIN_NAMES | {"fake_plugin"}
    monkeypatch.setenv("FUSION_ENGINE_LOAD_PLUGINS", " fake_plugin , ")  # by entry-point name, spaces ignored
    assert {p.name for p in Engine.from_plugins().plugins} == BUILTIN_NAMES | {"fake_plugin"}
    monkeypatch.delenv("FUSION_ENGINE_LOAD_PLUGINS")
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fake-plugin")
    assert "fake_plugin" not in {p.name for p in Engine.from_plugins().plugins}


# --- environment variables against the plugin packages installed from plugins/ ------------------------


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_repo_plugins = pytest.mark.skipif(
    not (_installed("fusion-engine-bilinear") and _installed("fusion-engine-cifar-resnet")),
    reason="plugin packages from plugins/ are not installed (pip install -e plugins/fusion-engine-bilinear "
    "plugins/fusion-engine-cifar-resnet)",
)


@needs_repo_plugins
def test_installed_plugins_load_by_default():
    engine = Engine.from_plugins()
    assert {p.name for p in engine.plugins} >= BUILTIN_NAMES | {"bilinear", "cifar_resnet"}
    assert engine.registry.get("fusion", "bilinear").plugin == "bilinear"
    assert engine.registry.get("backbone", "cifar_resnet").version == importlib.metadata.version(
        "fusion-engine-cifar-resnet"
    )


@needs_repo_plugins
@pytest.mark.parametrize(
    "value, expected",
    [
        ("", set()),
        ("bilinear", {"bilinear"}),
        ("bilinear,cifar_resnet", {"bilinear", "cifar_resnet"}),
    ],
)
def test_load_plugins_env_var_is_an_allow_list(monkeypatch, value, expected):
    monkeypatch.setenv("FUSION_ENGINE_LOAD_PLUGINS", value)
    engine = Engine.from_plugins()
    assert {p.name for p in engine.plugins} == BUILTIN_NAMES | expected
    assert ("bilinear" in engine.registry.names("fusion")) == ("bilinear" in expected)
    assert {"concat", "attention", "stacking"} <= set(engine.registry.names("fusion"))  # built-ins always


@needs_repo_plugins
def test_disable_plugins_env_var_removes_a_plugin(monkeypatch):
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "bilinear")
    engine = Engine.from_plugins()
    names = {p.name for p in engine.plugins}
    assert "bilinear" not in names and "cifar_resnet" in names
    with pytest.raises(ConfigError, match="unknown fusion 'bilinear'"):
        engine.build({"backbones": [TINY], "fusion": "bilinear", "num_classes": 2})
    # the deny-list wins over the allow-list
    monkeypatch.setenv("FUSION_ENGINE_LOAD_PLUGINS", "bilinear")
    assert {p.name for p in Engine.from_plugins().plugins} == BUILTIN_NAMES


# --- a bad installed plugin is isolated: shadowing, clashes, sys.exit() (issue #17) -------------------

BUILTIN_COMPONENTS = {
    "fusions": ("fusion", {"concat", "attention", "gated", "vote", "stacking"}),
    "extractors": ("extractor", {"avg", "max", "gem", "multiscale"}),
    "timm_backbones": ("backbone", {"timm"}),
}

IMPOSTOR = """
import fusion_engine
from fusion_engine import hookimpl
from fusion_engine.builtins.fusions import concat

fusion_engine.IMPOSTOR_IMPORTED = True

@hookimpl
def register_fusions(register):
    register("concat", concat, description="an impostor")
"""


@pytest.mark.parametrize("builtin", sorted(BUILTIN_NAMES))
def test_entry_point_named_like_a_builtin_is_a_failure_and_the_builtin_stays(fake_distribution, monkeypatch, builtin):
    import fusion_engine

    fake_distribution("fake-impostor", "6.6.6", IMPOSTOR, module="fake_impostor_module", entry_point=builtin)
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert (failure.name, failure.version, failure.distribution) == (builtin, "6.6.6", "fake-impostor")
    assert "built-in plugin" in failure.error and "rename the entry point" in failure.error
    assert not hasattr(fusion_engine, "IMPOSTOR_IMPORTED")  # refused before its code ran
    info = next(p for p in engine.plugins if p.name == builtin)
    assert (info.source, info.distribution) == ("built-in", "fusion-engine")
    kind, names = BUILTIN_COMPONENTS[builtin]
    assert names <= set(engine.registry.names(kind))
    assert {engine.registry.get(kind, name).plugin for name in names} == {builtin}
    assert {"attention", "gated", "vote", "stacking"} <= set(engine.registry.names("fusion"))
    assert engine.registry.get("fusion", "concat").description != "an impostor"

    # with the built-ins denied by distribution name, the impostor still does not take their place
    monkeypatch.setenv("FUSION_ENGINE_DISABLE_PLUGINS", "fusion-engine")
    engine = Engine.from_plugins()
    assert [f.name for f in engine.failures] == [builtin]
    assert not {p.name for p in engine.plugins} & BUILTIN_NAMES

    monkeypatch.delenv("FUSION_ENGINE_DISABLE_PLUGINS")
    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=rf"'{builtin}' \(fake-impostor 6\.6\.6\).*built-in plugin"):
        Engine.from_plugins()


def test_installed_plugin_registering_a_builtin_name_fails_whole_and_the_builtin_stays(fake_distribution, monkeypatch):
    fake_distribution(
        "fake-shadow",
        "1.0",
        """
        from fusion_engine import hookimpl
        from fusion_engine.builtins.extractors import avg
        from fusion_engine.builtins.fusions import concat

        @hookimpl
        def register_extractors(register):
            register("shadow_avg", avg)

        @hookimpl
        def register_fusions(register):
            register("shadow_other", concat)
            register("concat", concat, description="an impostor")
        """,
        entry_point="fake_shadow",
    )
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert (failure.name, failure.distribution) == ("fake_shadow", "fake-shadow")
    assert "fusion 'concat' is a built-in of plugin 'fusions'" in failure.error
    concat = engine.registry.get("fusion", "concat")
    assert (concat.plugin, concat.distribution) == ("fusions", "fusion-engine")
    assert concat.description != "an impostor"
    names = {c.name for c in engine.components()}
    assert "shadow_other" not in names and "shadow_avg" not in names  # all its components withdrawn
    assert "fake_shadow" not in {p.name for p in engine.plugins}
    assert engine.build({"backbones": [TINY], "num_classes": 2})(torch.rand(1, 3, 8, 8)).shape == (1, 2)

    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'fake_shadow' \(fake-shadow 1\.0\).*fusion 'concat'.*'fusions'"):
        Engine.from_plugins()


def test_two_installed_plugins_registering_one_name_the_later_fails_the_earlier_stays(fake_distribution):
    source = """
    from fusion_engine import hookimpl
    from fusion_engine.builtins.fusions import concat

    @hookimpl
    def register_fusions(register):
        register("shared_name", concat)
        register("only_{0}", concat)
    """
    fake_distribution("fake-first", "1.0", source.format("first"), entry_point="fake_first")
    fake_distribution("fake-second", "1.0", source.format("second"), entry_point="fake_second")
    engine = Engine.from_plugins()
    [failure] = engine.failures
    loaded = [p.name for p in engine.plugins if p.name in ("fake_first", "fake_second")]
    assert len(loaded) == 1 and failure.name != loaded[0]
    assert f"both plugin '{loaded[0]}' and plugin '{failure.name}'" in failure.error
    assert engine.registry.get("fusion", "shared_name").plugin == loaded[0]
    names = set(engine.registry.names("fusion"))
    assert f"only_{loaded[0][5:]}" in names and f"only_{failure.name[5:]}" not in names


def test_installed_plugin_registering_one_name_twice_is_a_failure(fake_distribution):
    fake_distribution(
        "fake-twice",
        "1.0",
        """
        from fusion_engine import hookimpl
        from fusion_engine.builtins.fusions import concat

        @hookimpl
        def register_fusions(register):
            register("twice", concat)
            register("twice", concat)
        """,
        entry_point="fake_twice",
    )
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert failure.name == "fake_twice" and "registered twice" in failure.error
    assert "twice" not in engine.registry.names("fusion")


SYS_EXIT_AT_IMPORT = "import sys\nsys.exit(3)\n"
SYS_EXIT_IN_HOOK = """
import sys
from fusion_engine import hookimpl

@hookimpl
def register_fusions(register):
    sys.exit(4)
"""


@pytest.mark.parametrize(
    "source, code", [(SYS_EXIT_AT_IMPORT, 3), (SYS_EXIT_IN_HOOK, 4)], ids=["at import", "in its hook"]
)
def test_plugin_calling_sys_exit_is_a_failure_not_the_end(fake_distribution, monkeypatch, source, code):
    fake_distribution("fake-exit", "0.1", source, entry_point="fake_exit")
    fake_distribution("fake-plugin", "1.2.3", GOOD_PLUGIN, entry_point="fake_plugin")
    engine = Engine.from_plugins()
    [failure] = engine.failures
    assert (failure.name, failure.version, failure.distribution) == ("fake_exit", "0.1", "fake-exit")
    assert failure.error == f"SystemExit: the plugin called sys.exit({code})"
    assert "Traceback" in failure.details
    assert "fake_exit" not in {p.name for p in engine.plugins}
    assert engine.registry.get("fusion", "fake_concat").plugin == "fake_plugin"  # the others load
    monkeypatch.setenv("FUSION_ENGINE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=rf"'fake_exit' \(fake-exit 0\.1\).*sys\.exit\({code}\)"):
        Engine.from_plugins()


def test_given_plugin_calling_sys_exit_raises_plugin_error_but_ctrl_c_goes_through(tmp_path, monkeypatch):
    class Exits:
        @hookimpl
        def register_fusions(self, register):
            sys.exit(5)

    class Interrupted:
        @hookimpl
        def register_fusions(self, register):
            raise KeyboardInterrupt

    with pytest.raises(PluginError, match=r"'Exits'.*sys\.exit\(5\)"):
        Engine.from_plugins([Exits()], entry_points=False)
    (tmp_path / "fe_exits_at_import.py").write_text("import sys\nsys.exit(6)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginError, match=r"'fe_exits_at_import'.*sys\.exit\(6\)"):
            Engine.from_plugins(["fe_exits_at_import"], entry_points=False)
    finally:
        sys.modules.pop("fe_exits_at_import", None)
    with pytest.raises(KeyboardInterrupt):
        Engine.from_plugins([Interrupted()], entry_points=False)


def test_components_and_built_models_record_their_distribution(fake_distribution):
    fake_distribution("fake-plugin", "1.2.3", GOOD_PLUGIN, entry_point="fake_plugin")
    engine = Engine.from_plugins([TinyPlugin()])
    assert engine.registry.get("fusion", "fake_concat").distribution == "fake-plugin"
    assert engine.registry.get("fusion", "mean_of_heads").distribution is None  # given in code
    model = engine.build(
        {"backbones": [TINY, {"name": "tiny", "extractor": "stage_max"}], "fusion": "fake_concat", "num_classes": 2}
    )
    assert sorted(model.components, key=lambda c: (c["kind"], c["name"])) == [
        {
            "kind": "backbone",
            "name": "timm",
            "plugin": "timm_backbones",
            "version": fusion_version(),
            "distribution": "fusion-engine",
        },
        {"kind": "backbone", "name": "tiny", "plugin": "TinyPlugin", "version": "9.8.7", "distribution": None},
        {
            "kind": "extractor",
            "name": "avg",
            "plugin": "extractors",
            "version": fusion_version(),
            "distribution": "fusion-engine",
        },
        {"kind": "extractor", "name": "stage_max", "plugin": "TinyPlugin", "version": "9.8.7", "distribution": None},
        {
            "kind": "fusion",
            "name": "fake_concat",
            "plugin": "fake_plugin",
            "version": "1.2.3",
            "distribution": "fake-plugin",
        },
    ]


def fusion_version() -> str:
    return importlib.metadata.version("fusion-engine")
