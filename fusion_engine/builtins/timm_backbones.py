"""Any timm model as a backbone, with hub or local pretrained weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_engine.plugin_api import (
    WEIGHTS_ENV_VAR,
    ConfigError,
    WeightsError,
    find_weights_entry,
    hookimpl,
    hub_reachable,
    load_weights_file,
    state_mismatch,
    suggest,
)


def _hub_cached(model) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return False
    return any(
        isinstance(try_to_load_from_cache(hub_id, f), str)
        for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )


def _offline_error(model_name: str) -> WeightsError:
    return WeightsError(
        f"pretrained weights for timm model '{model_name}' are not in the local cache and the hub cannot be "
        f'reached (offline?). Pass a local file instead: {{"name": "timm", "model": "{model_name}", '
        f'"weights": "/path/to/weights.safetensors"}}, or name weights listed in the index.json of a folder '
        f"given by --weights-dir / {WEIGHTS_ENV_VAR}."
    )


def _load_local(model: nn.Module, path: str) -> None:
    """Load a local state dict (classifier dropped) strictly; mismatches name the keys."""
    state = load_weights_file(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    classifier = model.pretrained_cfg.get("classifier") or ()
    for prefix in [classifier] if isinstance(classifier, str) else classifier:
        for key in [k for k in state if k == prefix or k.startswith(prefix + ".")]:
            state.pop(key)
    problem = state_mismatch(model.state_dict(), state, dtypes=False)
    if problem:
        raise WeightsError(
            f"weights file {path} does not fit timm model '{model.default_cfg.get('architecture')}': "
            f"tensors {problem}. Check the model name and model_kwargs."
        )
    model.load_state_dict(state, strict=True)


class TimmBackbone(nn.Module):
    """A timm model without its classifier; ``forward`` returns ``forward_features``."""

    def __init__(self, model: nn.Module, data_config: dict, rebuild_options: dict):
        super().__init__()
        self.model = model
        self.data_config = data_config
        self.rebuild_options = rebuild_options  # the options that rebuild this architecture without weights
        self.feature_dim = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Parameters by stage, input to output (timm's coarse grouping), for partial fine-tuning."""
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        named = dict(self.model.named_parameters())
        return [[named[n] for n in groups[k]] for k in sorted(groups)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map, the final features last."""
        final, stages = self.model.forward_intermediates(x)
        stages = list(stages)
        if not stages or final is not stages[-1]:  # CNNs without a head conv return the last stage itself
            stages.append(final)
        return stages


def _width_variant(model: str) -> float | None:
    """The width multiplier of a MobileNetV1 name timm does not register (``mobilenetv1_025`` -> 0.25)."""
    match = re.fullmatch(r"mobilenetv1_(\d{3})", model)
    return int(match.group(1)) / 100 if match else None


def _indexed_model_name(weights: str, architecture: str) -> str:
    """The timm model an index entry is for: ``timm:NAME``, or a width variant named by the weights."""
    if architecture.startswith("timm:"):
        return architecture.split(":", 1)[1]
    base = weights.split(".", 1)[0]
    if architecture.startswith("timm ") and _width_variant(base):
        return base
    raise ConfigError(f"weights '{weights}' are for '{architecture}', not a timm model fusion-engine can build")


def _create_model(model: str, model_kwargs: dict) -> nn.Module:
    """``timm.create_model`` without a classifier; MobileNetV1 widths other than 1.0 too."""
    import timm

    width = None if timm.is_model(model) else _width_variant(model)
    if width:
        from timm.models.efficientnet import _gen_mobilenet_v1  # timm registers width 1.0 only

        return _gen_mobilenet_v1(
            model,
            channel_multiplier=width,
            num_classes=0,
            pretrained_cfg=timm.models.get_pretrained_cfg("mobilenetv1_100"),
            **model_kwargs,
        )
    try:
        return timm.create_model(model, pretrained=False, num_classes=0, **model_kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise ConfigError(
            f"unknown timm model '{model}'{suggest(model, timm.list_models())}. See timm.list_models() for valid names."
        ) from None


def timm_backbone(
    model: str | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | list[int] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str | None = None,
) -> TimmBackbone:
    """Build ``timm.create_model(model, num_classes=0)``; ``weights`` is a local file or an indexed name."""
    import timm
    from timm.data import resolve_model_data_config

    model_kwargs = dict(model_kwargs or {})
    # An indexed name ("mobilenetv2_100.tf1_quant_in1k") has a dot too: look it up unless it is a file.
    entry = find_weights_entry(weights) if weights and not Path(weights).is_file() else None
    if weights and entry is None and not Path(weights).is_file():
        raise WeightsError(
            f"weights file {weights} does not exist, and '{weights}' is not a name in the "
            f"index.json of a folder given by --weights-dir / {WEIGHTS_ENV_VAR}"
        )
    if entry is not None:
        model = model or _indexed_model_name(weights, entry.get("architecture", ""))
        model_kwargs = {**entry.get("timm_kwargs", {}), **model_kwargs}
        mean = mean or entry.get("mean")
        std = std or entry.get("std")
        interpolation = interpolation or entry.get("interpolation")
        input_size = input_size or entry.get("input_size")
        weights = entry["path"]
    if not model:
        raise ConfigError("timm backbone needs 'model' (a timm model name such as 'resnet50') or indexed 'weights'")
    net = _create_model(model, model_kwargs)
    if weights:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        _load_local(net, weights)
    elif pretrained:
        if not _hub_cached(net) and not hub_reachable():
            raise _offline_error(model)
        net = timm.create_model(model, pretrained=True, num_classes=0, **model_kwargs)
    config = dict(resolve_model_data_config(net))
    if input_size is not None:
        size = [input_size] * 2 if isinstance(input_size, int) else list(input_size)[-2:]
        config["input_size"] = (config["input_size"][0], *size)
    for key, value in (("mean", mean), ("std", std), ("interpolation", interpolation)):
        if value is not None:
            config[key] = tuple(value) if isinstance(value, list) else value
    data_config = {k: config[k] for k in ("input_size", "mean", "std", "interpolation")}
    rebuild = {
        "model": model,
        "model_kwargs": model_kwargs,
        "input_size": list(data_config["input_size"][1:]),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "interpolation": data_config["interpolation"],
    }
    return TimmBackbone(net.eval(), data_config, rebuild)


@hookimpl
def register_backbones(register):
    register("timm", timm_backbone, description="Any timm model (timm.create_model), hub or local weights")
