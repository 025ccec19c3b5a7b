"""fusion_engine.testing: plugin registration for one test, and the conformance checks.

The checks pass on the built-in components and the bilinear plugin, and catch deliberately
broken components with a message that says what to fix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_engine import Engine, hookimpl
from fusion_engine.builtins import extractors, fusions
from fusion_engine.core.plugins import extra_plugins
from fusion_engine.testing import (
    PluginRegistration,
    check_backbone,
    check_extractor,
    check_fusion,
    check_plugin,
    plugin_fixture,
    registered_plugins,
)

SMALL = {"input_size": 32}  # timm test models at 32x32: fast


# --- components used below ---------------------------------------------------------------------


class Vector(nn.Module):
    """A well-behaved backbone giving vectors; subclasses break one rule each."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.data_config = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
        self.proj = nn.Linear(3 * 8 * 8, dim)
        self.feature_dim = dim

    def forward(self, x):
        return self.proj(x.flatten(1))


def vector(dim: int = 6):
    return Vector(dim)


class Heads(nn.Module):
    """A well-behaved fusion: one linear head per branch, logits summed."""

    def __init__(self, in_dims, num_classes):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in in_dims)

    def forward(self, features):
        return sum(h(f) for h, f in zip(self.heads, features))


def heads(in_dims: list[int], num_classes: int):
    return Heads(in_dims, num_classes)


class TinyPlugin:
    @hookimpl
    def register_backbones(self, register):
        register("vector", vector, description="test vector backbone")

    @hookimpl
    def register_fusions(self, register):
        register("heads", heads, description="test per-branch heads")


# --- registration -------------------------------------------------------------------------------

tiny_engine = plugin_fixture(TinyPlugin())


def test_plugin_fixture_yields_an_engine_with_the_plugin(tiny_engine):
    assert tiny_engine.registry.get("fusion", "heads").plugin == "TinyPlugin"
    assert "heads" in Engine.from_plugins().registry.names("fusion")  # every engine sees it during the test


def test_registered_plugins_context_manager_nests_and_restores_the_loader():
    tiny = TinyPlugin()
    with registered_plugins(tiny):
        assert extra_plugins() == [tiny]
        assert "vector" in Engine.from_plugins().registry.names("backbone")

        class Other:
            @hookimpl
            def register_extractors(self, register):
                register("first", lambda backbone: nn.Identity())

        with registered_plugins(Other()) as inner:
            engine = Engine.from_plugins()
            assert {"vector"} <= set(engine.registry.names("backbone")) and "first" in engine.registry.names(
                "extractor"
            )
        assert "first" not in Engine.from_plugins().registry.names("extractor")
        with pytest.raises(RuntimeError, match="closed"):
            inner(Other())
    assert extra_plugins() == []  # through the seam of core.plugins: nothing patched, nothing left
    assert "vector" not in Engine.from_plugins().registry.names("backbone")


def test_register_plugin_undo_removes_only_its_plugins(register_plugin):
    first, second = (
        TinyPlugin(),
        type("Second", (), {"register_fusions": hookimpl(lambda self, register: register("second", heads))})(),
    )
    undo_first = register_plugin(first)
    register_plugin(second)
    assert {"heads", "second"} <= set(Engine.from_plugins().registry.names("fusion"))
    undo_first()
    names = Engine.from_plugins().registry.names("fusion")
    assert "heads" not in names and "second" in names
    assert isinstance(register_plugin, PluginRegistration)


def test_registered_plugin_is_checked_by_name(register_plugin):
    register_plugin(TinyPlugin())
    assert isinstance(check_backbone("vector", dim=4), Vector)
    assert isinstance(check_fusion("heads", in_dims=[4, 6, 2], num_classes=5), Heads)


# --- the checks pass on the built-ins and the plugin packages -------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("timm:test_resnet", SMALL),
        ("timm:test_efficientnet", SMALL),
        ("timm:test_vit", {}),
    ],
)
def test_builtin_backbones_pass(name, options):
    backbone = check_backbone(name, **options)
    assert backbone.feature_dim > 0


@pytest.mark.parametrize(
    "name, options",
    [
        ("avg", {}),
        ("max", {}),
        ("avgmax", {}),
        ("gem", {}),
        ("gem", {"learnable": True}),
        ("multiscale", {"stages": 2}),
    ],
)
def test_builtin_extractors_pass(name, options):
    assert check_extractor(name, **options) is not None


def test_token_extractor_passes_on_a_transformer():
    check_extractor("token", backbone="timm:test_vit", token="cls")
    check_extractor("token", backbone="timm:test_vit", token="mean")
    check_extractor("multiscale", backbone="timm:test_resnet", stages=3, pool="avgmax")


@pytest.mark.parametrize(
    "name, options",
    [
        ("concat", {}),
        ("concat", {"hidden": 8}),
        ("attention", {"dim": 16, "heads": 2}),
        ("gated", {"dim": 8}),
        ("vote", {}),
        ("vote", {"weights": [1.0, 3.0]}),
        ("stacking", {"folds": 2}),
    ],
)
def test_builtin_fusions_pass(name, options):
    fusion = check_fusion(name, **options)
    if name == "stacking":
        assert bool(fusion.fitted)  # fitted before the other checks


def test_options_that_clash_with_check_parameters_go_in_options():
    fusion = check_fusion("stacking", options={"folds": 2, "seed": 3}, in_dims=[3], num_classes=2)
    assert fusion.seed == 3


def test_check_plugin_on_builtin_modules():
    checked = check_plugin(fusions, options={"stacking": {"folds": 2}})
    assert set(checked) == {f"fusion:{n}" for n in ("concat", "attention", "gated", "vote", "stacking")}
    with pytest.raises(AssertionError, match="extractor 'token'.*no class token"):
        check_plugin(extractors)  # the default toy backbone is a CNN: 'token' needs backbone=


def test_bilinear_plugin_passes():
    bilinear = pytest.importorskip("fusion_engine_bilinear")
    import fusion_engine_bilinear.plugin

    check_fusion(bilinear.bilinear_fusion, in_dims=[7, 12, 5], factor=2, dim=8)
    assert list(check_plugin(fusion_engine_bilinear.plugin)) == ["fusion:bilinear"]


def test_check_plugin_needs_components_and_required_options():
    class Empty:
        pass

    with pytest.raises(AssertionError, match="registers no component"):
        check_plugin(Empty())

    class Required:
        @hookimpl
        def register_fusions(self, register):
            register("needs_k", lambda in_dims, num_classes, k: Heads(in_dims, num_classes))

    with pytest.raises(AssertionError, match=r"required options \['k'\].*options=\{'needs_k'"):
        check_plugin(Required())
    assert list(check_plugin(Required(), options={"needs_k": {"k": 1}})) == ["fusion:needs_k"]


# --- the checks catch broken components -----------------------------------------------------------


def test_unknown_name_bad_option_and_failing_factory():
    with pytest.raises(AssertionError, match=r"unknown fusion 'concatt' \(did you mean 'concat'\?\).*register_plugin"):
        check_fusion("concatt")
    with pytest.raises(AssertionError, match=r"options rejected: .*unknown option 'hiden'.*did you mean 'hidden'"):
        check_fusion("concat", hiden=3)
    with pytest.raises(
        AssertionError, match=r"building it with options .* raised ValueError: dim must be a positive multiple of heads"
    ):
        check_fusion("attention", dim=10, heads=4)
    with pytest.raises(AssertionError, match="must return a torch.nn.Module"):
        check_fusion(lambda in_dims, num_classes: "not a module")


class WrongBatch(Vector):
    def forward(self, x):
        return super().forward(x).reshape(1, -1)


class WrongDim(Vector):
    def __init__(self):
        super().__init__()
        self.feature_dim = 7


class NoGradient(Vector):
    def forward(self, x):
        return super().forward(x).detach()


class Noisy(Vector):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, training=True)  # dropout left on in eval mode


class BatchDependent(Vector):
    def forward(self, x):
        out = super().forward(x)
        return out - out.mean(dim=0)


class UnsavedState(Vector):
    def __init__(self):
        super().__init__()
        self.offset = torch.randn(6)  # a plain attribute: not in state_dict

    def forward(self, x):
        return super().forward(x) + self.offset


class ExtraState(Vector):
    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


class BadStages(Vector):
    def forward_stages(self, x):
        return [x, super().forward(x) * 2]


class BadConfig(Vector):
    def __init__(self):
        super().__init__()
        self.data_config = {"input_size": (3, 8, 8), "mean": (0.5,), "std": (0.5,) * 3, "interpolation": "bilinear"}


@pytest.mark.parametrize(
    "factory, message",
    [
        (WrongBatch, r"forward\(images\) gave shape \(1, 12\) for a batch of 2; expected \(batch, dim\)"),
        (WrongDim, r"feature_dim is 7 but forward gives 6 features .*set feature_dim = 6"),
        (NoGradient, r"none of its 2 trainable parameters gets a gradient.*torch.no_grad\(\)"),
        (Noisy, r"two eval-mode forward passes on the same input differ.*no dropout or noise unless self.training"),
        (BatchDependent, r"an image alone gives other results than in a batch.*batch statistics"),
        (
            UnsavedState,
            r"differs .*missing from state_dict\(\); register tensors as nn.Parameter or with register_buffer",
        ),
        (ExtraState, r"state_dict\(\) holds non-tensor values \{'_extra_state': 'dict'\}"),
        (BadStages, r"last of forward_stages\(images\) .* must equal forward\(images\)"),
        (BadConfig, r"data_config\['mean'\] is \(0.5,\); give one number per channel \(3\)"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_broken_backbones_are_caught(factory, message):
    with pytest.raises(AssertionError, match=message) as info:
        check_backbone(factory)
    assert str(info.value).startswith(f"backbone factory {factory.__name__}(): ")


class WrongClasses(Heads):
    def forward(self, features):
        return F.pad(super().forward(features), (0, 1))


class DetachedBranch(Heads):
    def forward(self, features):
        return super().forward([features[0], features[1].detach()])


class NoGraph(Heads):
    def forward(self, features):
        with torch.no_grad():
            return super().forward(features)


class UnusedParameter(Heads):
    def __init__(self, in_dims, num_classes):
        super().__init__(in_dims, num_classes)
        self.unused = nn.Linear(2, 2)


class NoisyFusion(Heads):
    def forward(self, features):
        return super().forward([F.dropout(f, 0.3, training=True) for f in features])


class Parameterless(nn.Module):
    def forward(self, features):
        return torch.stack([f[:, :3] for f in features]).mean(0)


class PickledFit(Heads):
    """Keeps what fit() learned in a plain attribute: lost when saved to safetensors."""

    requires_fit = True

    def fit(self, features, y):
        self.bias = torch.randn(3)
        return self

    def forward(self, features):
        return super().forward(features) + getattr(self, "bias", torch.zeros(3))


class FitReturnsNone(Heads):
    requires_fit = True

    def fit(self, features, y):
        return None


class FitDoesNothing(Heads):
    requires_fit = True

    def fit(self, features, y):
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        return self


class HeadsMissingOne(Heads):
    """Claims a head per branch but exposes one fewer."""

    @property
    def branch_heads(self):
        return self.heads[:-1]


class HeadsOfFeatures(Heads):
    """Its branch heads give features, not logits."""

    def __init__(self, in_dims, num_classes):
        super().__init__(in_dims, num_classes)
        self.branch_heads = nn.ModuleList(nn.Linear(d, 2 * num_classes) for d in in_dims)


@pytest.mark.parametrize(
    "factory, message",
    [
        (HeadsMissingOne, r"branch_heads must be an nn.ModuleList with one head per branch \(2\), got ModuleList of 1"),
        (HeadsOfFeatures, r"branch_heads\[0\]\(features\[0\]\) gave shape \(4, 6\); expected that branch's logits"),
        (WrongClasses, r"gave shape \(4, 4\); expected logits \(batch, num_classes\) = \(4, 3\)"),
        (DetachedBranch, r"no gradient reaches the features of branch\(es\) \[1\]"),
        (NoGraph, r"its logits carry no gradient in train mode.*requires_fit = True"),
        (UnusedParameter, r"trainable parameters \['unused.weight', 'unused.bias'\] get no gradient"),
        (NoisyFusion, r"two eval-mode forward passes on the same input differ"),
        (lambda in_dims, num_classes: Parameterless(), r"no trainable parameters and does not set requires_fit"),
        (PickledFit, r"logits differs .*missing from state_dict\(\)"),
        (FitReturnsNone, r"fit\(features, y\) must return self"),
        (FitDoesNothing, r"after fit\(\) on separable features it is right on only"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_broken_fusions_are_caught(factory, message):
    with pytest.raises(AssertionError, match=message):
        check_fusion(factory)


class DetachedExtractor(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).detach()


class MapExtractor(nn.Module):
    def forward(self, x):
        return x.mean(dim=3)


class StagesWithoutCheck(nn.Module):
    uses_stages = True

    def forward(self, stages):
        return stages[-1].mean(dim=(2, 3))


@pytest.mark.parametrize(
    "factory, backbone, message",
    [
        (lambda backbone: DetachedExtractor(), None, r"no gradient flows back to the backbone's features"),
        (lambda backbone: MapExtractor(), None, r"gave shape \(2, 12, 4\) for a batch of 2; expected \(batch, dim\)"),
        (
            lambda backbone: StagesWithoutCheck(),
            Vector(),
            r"uses_stages = True but accepted a backbone without "
            r"forward_stages\(\); raise ValueError",
        ),
    ],
)
def test_broken_extractors_are_caught(factory, backbone, message):
    with pytest.raises(AssertionError, match=message):
        check_extractor(factory, backbone=backbone)


def test_a_backbone_without_parameters_skips_the_gradient_check():
    class Fixed(Vector):
        def __init__(self):
            super().__init__()
            self.proj.requires_grad_(False)

    assert isinstance(check_backbone(Fixed), Fixed)
