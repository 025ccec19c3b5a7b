"""Conformance checks for plugin components: :func:`check_backbone`, :func:`check_extractor`,
:func:`check_fusion`, and :func:`check_plugin` for every component a plugin registers.

Each builds one component (from its factory, or by registered name) and asserts the contract
of docs/plugins.md: output shapes, gradient flow, an eval-mode batch of one, a tensors-only
state dict that round-trips through safetensors with identical outputs, and determinism in
eval mode. A fitted fusion (``requires_fit = True``) is fitted with ``fit(features, y)``
first. Every failure is an ``AssertionError`` whose message says what to fix; the checks
return the built (and, for a fitted fusion, fitted) component for further tests.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fusion_engine.api.engine import Engine
from fusion_engine.core.preprocess import Preprocess
from fusion_engine.core.registry import Component, option_schema
from fusion_engine.errors import ConfigError

__all__ = ["check_backbone", "check_extractor", "check_fusion", "check_plugin"]

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_SEED = 0


class _Target:
    """A component under check: how to build it, and a label for messages. ``engine`` (None for a
    factory checked without one) is the engine a registered name was looked up in."""

    def __init__(self, kind: str, target, engine, options: dict):
        options = dict(options)
        self.engine = engine
        if isinstance(target, str):
            name, _, variant = target.partition(":")
            if variant and kind == "backbone":
                options = {"model": variant, **options}
            if engine is None:
                engine = self.engine = Engine.from_plugins()
            try:
                component = engine.registry.get(kind, name)
            except ConfigError as exc:
                raise AssertionError(
                    f"{exc}. Is the plugin installed (pip install -e .) or registered for the test "
                    "(register_plugin fixture)?"
                ) from None
            self.label = f"{kind} '{name}' (plugin '{component.plugin}')"
        elif callable(target):
            name = getattr(target, "__name__", type(target).__name__)
            self.label = f"{kind} factory {name}()"
            try:
                schema = option_schema(kind, name, target)
            except Exception as exc:
                raise AssertionError(
                    f"{self.label}: its signature cannot become an option schema ({exc}); annotate "
                    "each option with a type pydantic understands"
                ) from exc
            component = Component(kind, name, target, "(factory)", None, "", schema)
        else:
            raise TypeError(f"give a {kind} factory or a registered {kind} name, not {type(target).__name__}")
        try:
            self.options = component.validate_options(options, "check")
        except ConfigError as exc:
            raise AssertionError(f"{self.label}: options rejected: {exc}") from None
        self.factory = component.factory

    def build(self, *args):
        try:
            module = self.factory(*args, **self.options)
        except Exception as exc:
            raise AssertionError(
                f"{self.label}: building it with options {self.options} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(module, torch.nn.Module):
            raise AssertionError(
                f"{self.label}: the factory returned a {type(module).__name__}; it must return a torch.nn.Module"
            )
        return module

    def fail(self, message: str):
        raise AssertionError(f"{self.label}: {message}")


def _options(options: dict | None, extra: dict) -> dict:
    return {**extra, **(options or {})}


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _map(fn, x):
    return [fn(t) for t in x] if isinstance(x, (list, tuple)) else fn(x)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _close(a, b, tol: float) -> bool:
    """Same shape and equal within ``tol``, relative to each value and to the largest one."""
    if a.shape != b.shape:
        return False
    scale = 1 + (float(b.abs().max()) if b.numel() else 0.0)
    return bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * scale))


def _check_output(t: _Target, out, batch: int, what: str, dims: tuple[int, ...]):
    if not isinstance(out, torch.Tensor):
        t.fail(f"{what} returned a {type(out).__name__}; it must return a torch.Tensor")
    if out.dim() not in dims or out.shape[0] != batch:
        want = " or ".join(
            {2: "(batch, dim)", 3: "(batch, tokens, dim)", 4: "(batch, channels, height, width)"}[d] for d in dims
        )
        t.fail(f"{what} gave shape {tuple(out.shape)} for a batch of {batch}; expected {want}")
    if not out.is_floating_point():
        t.fail(f"{what} gave dtype {out.dtype}; features and logits must be floating point")
    if not torch.isfinite(out).all():
        t.fail(f"{what} gave NaN or infinite values for ordinary input")


def _check_eval_behaviour(t: _Target, module, run, inputs, out, what: str):
    """Determinism and batch-of-one consistency in eval mode."""
    with torch.no_grad():
        again = run(module, inputs)
        if not (again.shape == out.shape and _close(again, out, 1e-5)):
            t.fail(
                f"two eval-mode {what} passes on the same input differ (max |difference| "
                f"{_max_diff(again, out):.3g}); in eval mode the output must be deterministic: no dropout or "
                "noise unless self.training, no random numbers in forward"
            )
        one = run(module, _map(lambda x: x[:1], inputs))
    if one.shape[0] != 1 or one.shape[1:] != out.shape[1:]:
        t.fail(
            f"an eval-mode batch of one gave shape {tuple(one.shape)}; expected {(1, *out.shape[1:])} (does forward "
            "squeeze the batch dimension?)"
        )
    if not _close(one, out[:1], 1e-4):
        t.fail(
            f"in eval mode, an image alone gives other results than in a batch (max |difference| "
            f"{_max_diff(one, out[:1]):.3g}); do not use batch statistics in eval mode (BatchNorm in train mode, "
            "normalising across the batch)"
        )


def _check_round_trip(t: _Target, module, rebuild, run, inputs, what: str):
    """state_dict: tensors only, saved with safetensors, loaded into a fresh instance: same outputs."""
    state = module.state_dict()
    foreign = {k: type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if foreign:
        t.fail(
            f"state_dict() holds non-tensor values {foreign}; a model saves to safetensors, so keep state in "
            "parameters and buffers (register_buffer) and settings in plain attributes"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.safetensors"
        try:
            save_file(tensors, str(path))
        except Exception as exc:
            t.fail(f"its state_dict() cannot be saved with safetensors: {type(exc).__name__}: {exc}")
        loaded = load_file(str(path))
    torch.manual_seed(_SEED + 1)  # a fresh instance with other random initial values
    fresh = rebuild()
    try:
        fresh.load_state_dict(loaded, strict=True)
    except Exception as exc:
        t.fail(
            f"a fresh instance built with the same options cannot load the saved state_dict (strict): {exc}. "
            "The factory must build the same architecture for the same options"
        )
    device = next((p.device for p in module.parameters()), None) or next((b.device for b in module.buffers()), None)
    if device is not None:
        fresh.to(device)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        before, after = run(module, inputs), run(fresh, inputs)
    if not _close(after, before, 1e-5):
        t.fail(
            f"after saving state_dict() with safetensors and loading it into a fresh instance, the {what} differs "
            f"(max |difference| {_max_diff(after, before):.3g}): state the output depends on is missing from "
            "state_dict(); register tensors as nn.Parameter or with register_buffer (persistent), and make the "
            "factory deterministic for given options"
        )


def _images(data_config: dict, batch: int, device, t: _Target):
    config = data_config
    if not isinstance(config, dict):
        t.fail(f"data_config is a {type(config).__name__}; it must be a dict with input_size, mean, std, interpolation")
    missing = [k for k in ("input_size", "mean", "std", "interpolation") if k not in config]
    if missing:
        t.fail(
            f"data_config lacks {missing}; it needs input_size (channels, height, width), mean, std (one value per "
            "channel) and interpolation"
        )
    size = config["input_size"]
    if (
        len(tuple(size)) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        or size[0] not in (1, 3)
    ):
        t.fail(
            f"data_config['input_size'] is {size!r}; it must be (channels, height, width): positive ints, 1 or 3 "
            "channels"
        )
    for key in ("mean", "std"):
        values = config[key]
        if not isinstance(values, (list, tuple)) or len(values) != size[0]:
            t.fail(f"data_config['{key}'] is {values!r}; give one number per channel ({size[0]})")
    if any(v <= 0 for v in config["std"]):
        t.fail(f"data_config['std'] is {config['std']!r}; every std must be > 0")
    if config["interpolation"] not in _INTERPOLATIONS:
        t.fail(f"data_config['interpolation'] is {config['interpolation']!r}; valid: {', '.join(_INTERPOLATIONS)}")
    generator = torch.Generator().manual_seed(_SEED)
    images = torch.rand(batch, 3, *size[1:], generator=generator)
    return Preprocess(config)(images).to(device)


def _extractor_factory(engine, name: str):
    """The factory of extractor ``name``: from ``engine`` when it has one, else from the built-in
    plugins (None when they do not offer it either, e.g. disabled with FUSION_ENGINE_DISABLE_PLUGINS)."""
    if engine is None or name not in engine.registry.names("extractor"):
        engine = Engine.from_plugins(entry_points=False)
        if name not in engine.registry.names("extractor"):
            return None
    return engine.registry.get("extractor", name).factory


def _feature_width(out) -> int:
    return int(out.shape[2] if out.dim() == 3 else out.shape[1])


def check_backbone(backbone, *, engine=None, batch_size: int = 2, device="cpu", options: dict | None = None, **kwargs):
    """Build a backbone (factory or registered name, ``"timm:resnet18"`` style allowed) and check it.

    Checks: ``data_config`` is complete; ``feature_dim`` matches ``forward``'s output, a map
    ``(B, C, H, W)``, tokens ``(B, N, C)`` or a vector ``(B, D)``; ``forward_stages`` (if any) ends
    with that output; eval mode is deterministic and a batch of one agrees with the batch; the
    state dict is tensors only and round-trips through safetensors into a fresh instance with
    identical outputs; when it has trainable parameters, gradients reach them (as when unfrozen).
    Options go as keyword arguments, or in ``options=`` when a name clashes with a parameter here.
    Returns the built backbone.
    """
    t = _Target("backbone", backbone, engine, _options(options, kwargs))
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (a batch of one is checked against it)")
    torch.manual_seed(_SEED)
    module = t.build()
    for attr in ("data_config", "feature_dim"):
        if not hasattr(module, attr):
            t.fail(f"the module has no '{attr}' attribute (see the backbone contract in docs/plugins.md)")
    dims = module.feature_dim
    if not (isinstance(dims, int) and not isinstance(dims, bool) and dims > 0) and not (
        isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and d > 0 for d in dims)
    ):
        t.fail(f"feature_dim is {dims!r}; it must be a positive int (or a list of per-stage ints)")
    x = _images(module.data_config, batch_size, device, t)
    module.to(device).eval()

    def run(m, inputs):
        return m(inputs)

    with torch.no_grad():
        out = run(module, x)
    _check_output(t, out, batch_size, "forward(images)", (2, 3, 4))
    width = _feature_width(out)
    if isinstance(dims, int) and dims != width:
        t.fail(
            f"feature_dim is {dims} but forward gives {width} features per position (shape {tuple(out.shape)}); "
            f"set feature_dim = {width}"
        )
    if out.dim() == 3:
        prefix = getattr(module, "num_prefix_tokens", 0) or 0
        if not isinstance(prefix, int) or not 0 <= prefix < out.shape[1]:
            t.fail(
                f"num_prefix_tokens is {prefix!r} for {out.shape[1]} tokens; it must count the class/register "
                "tokens at the start (0 if none)"
            )
    avg = _extractor_factory(t.engine, "avg")
    if avg is not None:
        pooled = avg(module)(out)
        if pooled.shape != (batch_size, width):
            t.fail(f"the 'avg' extractor turns its output into shape {tuple(pooled.shape)}, not (batch, {width})")
    if hasattr(module, "forward_stages"):
        with torch.no_grad():
            stages = module.forward_stages(x)
        if not isinstance(stages, (list, tuple)) or not stages or not all(isinstance(s, torch.Tensor) for s in stages):
            t.fail("forward_stages(images) must return a non-empty list of tensors, the final features last")
        if any(s.shape[0] != batch_size for s in stages):
            t.fail(
                f"forward_stages gave shapes {[tuple(s.shape) for s in stages]}; each must keep the batch size "
                f"{batch_size} first"
            )
        if not _close(stages[-1], out, 1e-5):
            t.fail(
                f"the last of forward_stages(images) (shape {tuple(stages[-1].shape)}) must equal forward(images) "
                f"(shape {tuple(out.shape)})"
            )
    _check_eval_behaviour(t, module, run, x, out, "forward")
    _check_round_trip(t, module, lambda: t.build(), run, x, "output")
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if trainable:  # as when the branch is fine-tuned ("freeze": false)
        module.train()
        module.zero_grad(set_to_none=True)
        out = module(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(_SEED)).to(out.device)
        if out.requires_grad:
            (out.float() * weights).sum().backward()
        reached = [n for n, p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        module.zero_grad(set_to_none=True)
        module.eval()
        if not reached:
            t.fail(
                f"none of its {len(trainable)} trainable parameters gets a gradient from forward's output, so "
                'fine-tuning ("freeze": false) cannot train it; forward must not run under torch.no_grad() or '
                "detach / go through numpy (a backbone that cannot learn should have no trainable parameters)"
            )
    return module


def _toy_backbone():
    """A tiny CNN backbone (maps and stages) for checking extractors."""

    class ToyBackbone(nn.Module):
        feature_dim = 12
        num_prefix_tokens = 0

        def __init__(self):
            super().__init__()
            self.data_config = {
                "input_size": (3, 16, 16),
                "mean": (0.5, 0.5, 0.5),
                "std": (0.25, 0.25, 0.25),
                "interpolation": "bilinear",
            }
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
            self.stage = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())

        def forward_stages(self, x):
            a = self.stem(x)
            return [a, self.stage(a)]

        def forward(self, x):
            return self.forward_stages(x)[-1]

    torch.manual_seed(_SEED)
    return ToyBackbone().eval()


def check_extractor(
    extractor, *, backbone=None, engine=None, batch_size: int = 2, device="cpu", options: dict | None = None, **kwargs
):
    """Build an extractor on ``backbone`` and check it.

    ``backbone`` is a backbone module, a registered backbone name (``"timm:test_resnet"``), or
    None for a tiny CNN with ``forward_stages``. Checks: one ``(B, D)`` vector per image; eval
    mode deterministic and a batch of one agreeing with the batch; gradients reach the
    backbone's features (for fine-tuning) and the extractor's own trainable parameters; a
    tensors-only state dict that round-trips through safetensors. Returns the extractor.
    """
    t = _Target("extractor", extractor, engine, _options(options, kwargs))
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (a batch of one is checked against it)")
    if backbone is None:
        backbone = _toy_backbone()
    elif isinstance(backbone, str):
        backbone = _Target("backbone", backbone, engine or t.engine, {}).build()
    backbone.to(device).eval()
    module = t.build(backbone)
    uses_stages = bool(getattr(module, "uses_stages", False))
    if uses_stages and not hasattr(backbone, "forward_stages"):
        t.fail(
            "it sets uses_stages = True but accepted a backbone without forward_stages(); raise ValueError in the "
            "factory for such a backbone"
        )
    x = _images(backbone.data_config, batch_size, device, t)
    with torch.no_grad():
        features = backbone.forward_stages(x) if uses_stages else backbone(x)
    features = _map(lambda f: f.detach(), features)
    module.to(device).eval()

    def run(m, inputs):
        return m(inputs)

    with torch.no_grad():
        out = run(module, features)
    _check_output(t, out, batch_size, "forward(features)", (2,))
    _check_eval_behaviour(t, module, run, features, out, "forward")
    _check_round_trip(t, module, lambda: t.build(backbone), run, features, "output")
    module.train()
    module.zero_grad(set_to_none=True)
    leaves = _map(lambda f: f.clone().requires_grad_(True), features)
    out = module(leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(_SEED)).to(out.device)
    if out.requires_grad:
        (out.float() * weights).sum().backward()
    if not any(f.grad is not None and bool(f.grad.abs().sum() > 0) for f in _as_list(leaves)):
        t.fail(
            "no gradient flows back to the backbone's features, so a fine-tuned (unfrozen) backbone cannot learn "
            "through it; avoid torch.no_grad(), .detach() and numpy in forward"
        )
    silent = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    module.zero_grad(set_to_none=True)
    module.eval()
    if silent:
        t.fail(f"trainable parameters {silent} get no gradient; use them in forward, or set requires_grad=False")
    return module


def _synthetic_features(in_dims, num_classes: int, n: int):
    """Separable features per branch: class centres plus noise; labels cycle through the classes."""
    generator = torch.Generator().manual_seed(_SEED)
    y = torch.arange(n) % num_classes
    features = [
        (3 * torch.randn(num_classes, d, generator=generator))[y] + torch.randn(n, d, generator=generator)
        for d in in_dims
    ]
    return features, y


def _check_branch_heads(t, heads, batch: list, num_classes: int) -> None:
    """``branch_heads`` (what independent branches train): one module per branch, each giving its branch's logits."""
    if not isinstance(heads, torch.nn.ModuleList) or len(heads) != len(batch):
        t.fail(
            f"branch_heads must be an nn.ModuleList with one head per branch ({len(batch)}), got "
            f"{type(heads).__name__}" + (f" of {len(heads)}" if isinstance(heads, torch.nn.ModuleList) else "")
        )
    with torch.no_grad():
        for i, (head, features) in enumerate(zip(heads, batch)):
            out = head(features)
            if tuple(out.shape) != (len(features), num_classes):
                t.fail(
                    f"branch_heads[{i}](features[{i}]) gave shape {tuple(out.shape)}; expected that branch's "
                    f"logits ({len(features)}, {num_classes})"
                )


def check_fusion(
    fusion,
    *,
    in_dims: Iterable[int] = (8, 5),
    num_classes: int = 3,
    engine=None,
    batch_size: int = 4,
    device="cpu",
    options: dict | None = None,
    **kwargs,
):
    """Build a fusion for branches of widths ``in_dims`` and ``num_classes`` classes, and check it.

    A fitted fusion (``requires_fit = True``) is first fitted with ``fit(features, y)`` on
    synthetic separable features and must return itself. Checks: logits ``(B, num_classes)``;
    eval mode deterministic and a batch of one agreeing with the batch; a tensors-only state
    dict that round-trips through safetensors into a fresh (unfitted) instance with identical
    logits; for a fusion trained by gradient, every trainable parameter and every branch's
    features get a gradient from the loss; ``branch_heads``, if the fusion has them, one per branch,
    each giving its branch's logits. Returns the (fitted) fusion.
    """
    in_dims = [int(d) for d in in_dims]
    t = _Target("fusion", fusion, engine, _options(options, kwargs))
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (a batch of one is checked against it)")
    torch.manual_seed(_SEED)
    module = t.build(list(in_dims), num_classes)
    requires_fit = bool(getattr(module, "requires_fit", False))
    features, y = _synthetic_features(in_dims, num_classes, max(8 * num_classes, 2 * batch_size))
    if requires_fit:
        if not callable(getattr(module, "fit", None)):
            t.fail("it sets requires_fit = True but has no fit(features, y) method")
        try:
            result = module.fit([f.numpy() for f in features], y.numpy())
        except Exception as exc:
            t.fail(
                f"fit(features, y) raised {type(exc).__name__}: {exc} (features: a list of float32 arrays (N, D_i), "
                "y: int64 labels (N,))"
            )
        if result is not module:
            t.fail("fit(features, y) must return self (as scikit-learn estimators do)")
    elif not any(p.requires_grad for p in module.parameters()):
        t.fail(
            "it has no trainable parameters and does not set requires_fit = True, so there is nothing to train; "
            "add parameters, or set requires_fit = True and implement fit(features, y)"
        )
    module.to(device).eval()
    batch = [f[:batch_size].to(device) for f in features]

    def run(m, inputs):
        return m(list(inputs))

    with torch.no_grad():
        out = run(module, batch)
    _check_output(t, out, batch_size, "forward(features)", (2,))
    if out.shape[1] != num_classes:
        t.fail(
            f"forward(features) gave shape {tuple(out.shape)}; expected logits (batch, num_classes) = "
            f"({batch_size}, {num_classes})"
        )
    _check_eval_behaviour(t, module, run, batch, out, "forward")
    _check_round_trip(t, module, lambda: t.build(list(in_dims), num_classes), run, batch, "logits")
    if hasattr(module, "branch_heads"):
        _check_branch_heads(t, module.branch_heads, batch, num_classes)
    if requires_fit:
        with torch.no_grad():
            fitted_accuracy = float((run(module, [f.to(device) for f in features]).argmax(1).cpu() == y).float().mean())
        if fitted_accuracy < 1.5 / num_classes:
            t.fail(
                f"after fit() on separable features it is right on only {fitted_accuracy:.0%} of its own training "
                "data; does fit() store what it learned in the parameters / buffers that forward uses?"
            )
        return module
    module.train()
    module.zero_grad(set_to_none=True)
    leaves = [f.clone().requires_grad_(True) for f in batch]
    loss = F.cross_entropy(module(leaves), y[:batch_size].to(device))
    if not loss.requires_grad:
        t.fail(
            "its logits carry no gradient in train mode, so it cannot be trained; forward must not run under "
            "torch.no_grad() or detach / go through numpy (a fusion fitted otherwise sets requires_fit = True)"
        )
    loss.backward()
    silent = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    blind = [i for i, f in enumerate(leaves) if f.grad is None or not bool(f.grad.abs().sum() > 0)]
    module.zero_grad(set_to_none=True)
    module.eval()
    if silent:
        t.fail(
            f"trainable parameters {silent} get no gradient from the loss; use them in forward, or set "
            "requires_grad=False (or register a buffer)"
        )
    if blind:
        t.fail(
            f"no gradient reaches the features of branch(es) {blind}, so fine-tuned (unfrozen) backbones cannot "
            "learn through this fusion; use every branch and avoid .detach() / numpy in forward"
        )
    return module


def check_plugin(plugin, *, options: dict[str, dict] | None = None, **settings) -> dict[str, Any]:
    """Run the matching check on every component ``plugin`` registers; returns ``{"kind:name": module}``.

    ``plugin`` is a module, an importable module name or an object with hook implementations.
    ``options`` maps ``"name"`` or ``"kind:name"`` to that component's options (needed for
    components with required options). ``settings`` go to every check (``device=``, ...).
    """
    if isinstance(plugin, str):
        plugin = importlib.import_module(plugin)
    engine = Engine.from_plugins([plugin], entry_points=False)
    name = engine._loader.manager.get_name(plugin)  # "given", or a built-in module under its own name
    components = [c for c in engine.components() if c.plugin == name]
    if not components:
        raise AssertionError(
            f"plugin {getattr(plugin, '__name__', plugin)!r} registers no component; implement "
            "register_backbones / register_extractors / register_fusions, marked with @hookimpl"
        )
    options = options or {}
    checks = {"backbone": check_backbone, "extractor": check_extractor, "fusion": check_fusion}
    checked = {}
    for c in components:
        given = options.get(f"{c.kind}:{c.name}", options.get(c.name, {}))
        required = [k for k, f in c.options.model_fields.items() if f.is_required() and k not in given]
        if required:
            raise AssertionError(
                f"{c.kind} '{c.name}' has required options {required}; give them with "
                f"check_plugin(..., options={{'{c.name}': {{...}}}})"
            )
        checked[f"{c.kind}:{c.name}"] = checks[c.kind](c.name, engine=engine, options=given, **settings)
    return checked
