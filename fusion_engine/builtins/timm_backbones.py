"""Any timm model as a backbone, with hub or local pretrained weights."""

from __future__ import annotations

import os
import re
import time
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
    indexed_timm_model,
    load_weights_file,
    state_mismatch,
    suggest,
    weights_entries,
)

HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_REACHABLE: dict[str, float] = {}  # when a hub probe last went unanswered


def _hub_answers() -> bool:
    """``hub_reachable()``; a probe that got no answer is remembered for a minute, so that the branches
    of one build do not each wait for it."""
    if time.monotonic() - _REACHABLE.get("no answer", -1e9) < 60:
        return False
    if hub_reachable():
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):  # a real probe, not the switch
        _REACHABLE["no answer"] = time.monotonic()
    return False


def _hub_cached_file(model) -> str | None:
    """The model's pretrained weights file in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    filename = model.pretrained_cfg.get("hf_hub_filename")
    for f in (filename,) if filename else HUB_FILES:
        found = try_to_load_from_cache(hub_id, f)
        if isinstance(found, str):
            return found
    return None


def _published(model) -> str | None:
    """Where timm publishes this model's pretrained weights (a hub id or a URL), or None."""
    cfg = model.pretrained_cfg
    return cfg.get("hf_hub_id") or cfg.get("url") or None


def _offline_error(model_name: str) -> WeightsError:
    return WeightsError(
        f"pretrained weights for timm model '{model_name}' are not in the local cache and the hub cannot be "
        f'reached (offline?). Pass a local file instead: {{"name": "timm", "model": "{model_name}", '
        f'"weights": "/path/to/weights.safetensors"}}, or name weights listed in the index.json of a folder '
        f'given by --weights-dir / {WEIGHTS_ENV_VAR}; or ask for random weights with "pretrained": false.'
    )


def _indexed_weights_for(model: str) -> str | None:
    """The name of the first entry of the weights index (--weights-dir folders in order, then weights shipped by
    installed packages) holding weights for timm model ``model`` (built as ``model``, or named ``model``)."""
    try:
        entries = weights_entries()
    except WeightsError:  # a broken index.json (naming it fails with a clear error)
        return None
    for name, entry in entries.items():
        if (indexed_timm_model(name, entry) == model or name == model) and Path(entry["path"]).is_file():
            return name
    return None


def _load_local(model: nn.Module, path: str, entry: dict | None = None) -> None:
    """Load a local state dict (classifier dropped) strictly; mismatches name the keys. An index ``entry``'s
    sha256, when it has one, is checked on the bytes read (a mismatch names the file and the index)."""
    if entry is not None and entry.get("sha256"):
        state = load_weights_file(path, sha256=str(entry["sha256"]), recorded_in=entry.get("recorded_in", ""))
    else:
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
    """A timm model without its classifier; ``forward`` returns ``forward_features`` as a (B, C, H, W) map
    (models that work channels-last, such as Swin, are permuted back) or (B, N, C) tokens.

    ``pretrained_source`` says where the weights came from (``hub:ID``, ``hub cache:ID``, ``index:NAME``,
    ``file:PATH``), None for random weights; ``random_init_reason`` says why, when pretrained weights were
    wanted (the default) but could not be had."""

    def __init__(
        self,
        model: nn.Module,
        data_config: dict,
        rebuild_options: dict,
        pretrained_source: str | None = None,
        random_init_reason: str | None = None,
    ):
        super().__init__()
        self.model = model
        self.data_config = data_config
        self.rebuild_options = rebuild_options  # the options that rebuild this architecture without weights
        self.feature_dim = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's declared layout
        self.output_fmt = "NCHW"  # what forward returns for maps, whatever the model's own layout
        self.pretrained_source = pretrained_source
        self.random_init_reason = random_init_reason

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Parameters by stage, input to output (timm's coarse grouping), for partial fine-tuning."""
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        named = dict(self.model.named_parameters())
        return [[named[n] for n in groups[k]] for k in sorted(groups)]

    def split(self, blocks: int) -> tuple[nn.Module, nn.Module]:
        """``(trunk, top)`` sharing this backbone's modules, with ``top(trunk(x))`` equal to ``self(x)``: ``top``
        is the last ``blocks`` stages (plus the head convolution that follows them in EfficientNets).
        ConfigError for architectures whose split is not known here."""
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3
        from timm.models.resnet import ResNet

        m = self.model
        if isinstance(m, (EfficientNet, MobileNetV3)):  # stem, blocks (a Sequential of stages)[, conv_head, bn2]
            stem, stages = [m.conv_stem, m.bn1], list(m.blocks)
            tail = [m.conv_head, m.bn2] if isinstance(m, EfficientNet) else []
        elif isinstance(m, ResNet):
            stem, stages, tail = [m.conv1, m.bn1, m.act1, m.maxpool], [m.layer1, m.layer2, m.layer3, m.layer4], []
        else:
            raise ConfigError(
                f"cannot train the top blocks of timm model '{self.rebuild_options['model']}' "
                f"({type(m).__name__}): the trunk/top split is known for EfficientNet-family models (MobileNetV1/V2, "
                "EfficientNet, MixNet, ...), MobileNetV3 and ResNets; train this branch frozen (--train-blocks 0) "
                "or fine-tune it (--mode finetune --unfreeze N)"
            )
        if not 1 <= blocks <= len(stages):
            raise ConfigError(
                f"--train-blocks {blocks}: timm model '{self.rebuild_options['model']}' has {len(stages)} stages; "
                f"choose 0 to {len(stages)}"
            )
        return nn.Sequential(*stem, *stages[: len(stages) - blocks]), nn.Sequential(*stages[-blocks:], *tail)

    def _as_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.channels_last_output and x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._as_nchw(self.model.forward_features(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map (NCHW), the final features last."""
        final, stages = self.model.forward_intermediates(x)
        stages = list(stages)
        if not stages or final is not stages[-1]:  # CNNs without a head conv return the last stage itself
            stages.append(self._as_nchw(final))
        return stages


def _width_variant(model: str) -> float | None:
    """The width multiplier of a MobileNetV1 name timm does not register (``mobilenetv1_025`` -> 0.25)."""
    match = re.fullmatch(r"mobilenetv1_(\d{3})", model)
    return int(match.group(1)) / 100 if match else None


def _indexed_model_name(weights: str, architecture: str) -> str:
    """The timm model an index entry is for: ``timm:NAME``, or a width variant named by the weights."""
    model = indexed_timm_model(weights, {"architecture": architecture})
    if model:
        return model
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


def _pretrained_net(model: str, model_kwargs: dict, cached: str) -> nn.Module:
    """``model`` with timm's pretrained weights read from ``cached`` (a file of the local hub cache), through
    timm's own loading (its checkpoint filters, classifier dropped) but never unpickling code."""
    import timm

    overlay = {**model_kwargs.get("pretrained_cfg_overlay", {}), "state_dict": load_weights_file(cached)}
    kwargs = {**model_kwargs, "pretrained_cfg_overlay": overlay}
    pretrained = timm.create_model(model, pretrained=True, num_classes=0, **kwargs)
    pretrained.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of every tensor
    return pretrained


def _random_init_reason(model: str, hub_weights: bool) -> str:
    if not hub_weights:
        return f"timm publishes none for '{model}' and no weights index entry (--weights-dir, weights package) has them"
    return "the hub cannot be reached; they are in neither its local cache nor a weights index (--weights-dir, package)"


def timm_backbone(
    model: str | None = None,
    pretrained: bool | None = None,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    input_size: int | list[int] | None = None,
    max_input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    interpolation: str | None = None,
) -> TimmBackbone:
    """Build ``timm.create_model(model, num_classes=0)``; ``weights`` is a local file or an indexed name.

    ``pretrained`` (default: when weights can be had) takes pretrained weights from, in this order, the
    weights index (--weights-dir folders, then installed weights packages; the file's recorded sha256 is
    checked), the local hub cache, the hub; left out and none can be had, the model is randomly
    initialised (``random_init_reason`` says why; ``Engine.build`` warns); ``True`` then raises
    ``WeightsError``; ``False`` asks for random weights.

    ``input_size`` replaces the model's own; without it, ``max_input_size`` caps the model's own (side in
    px; ``fusion-engine train`` sets it from the data's image size, see ``core.input_size``).
    """
    import timm
    from timm.data import resolve_model_data_config

    model_kwargs = dict(model_kwargs or {})
    explicit_size = input_size is not None  # the caller's; a weights index entry's own size may still be capped
    source = reason = net = None
    if weights is None and pretrained is not False:
        if not model:
            raise ConfigError("timm backbone needs 'model' (a timm model name such as 'resnet50') or indexed 'weights'")
        weights = _indexed_weights_for(model)
        if weights is None:
            net = _create_model(model, model_kwargs)
            hub_weights = timm.is_model(model) and _published(net)  # width variants have none on the hub
            cached = _hub_cached_file(net) if hub_weights else None
            if cached:
                net, source = _pretrained_net(model, model_kwargs, cached), f"hub cache:{hub_weights}"
            elif hub_weights and _hub_answers():
                try:
                    net = timm.create_model(model, pretrained=True, num_classes=0, **model_kwargs)
                    source = f"hub:{hub_weights}"
                except Exception as exc:  # a download that failed half-way: an error only when asked for
                    if pretrained:
                        raise WeightsError(
                            f"downloading pretrained weights for timm model '{model}' failed: {exc}"
                        ) from exc
                    reason = f"downloading them failed ({type(exc).__name__}: {exc})"
            elif pretrained and not hub_weights:
                raise WeightsError(
                    f"timm publishes no pretrained weights for '{model}'; pass a local file with \"weights\", or "
                    f'ask for random weights with "pretrained": false'
                )
            elif pretrained:
                raise _offline_error(model)
            else:
                reason = _random_init_reason(model, bool(hub_weights))
    # An indexed name ("mobilenetv2_100.tf1_quant_in1k") has a dot too: look it up unless it is a file.
    entry = find_weights_entry(weights) if weights and not Path(weights).is_file() else None
    if weights and entry is None and not Path(weights).is_file():
        raise WeightsError(
            f"weights file {weights} does not exist, and '{weights}' is not a name in the "
            f"index.json of a folder given by --weights-dir / {WEIGHTS_ENV_VAR}, nor of an installed weights "
            f"package (fusion-engine list shows the weights it can find)"
        )
    if entry is not None:
        source = f"index:{weights}"
        model = model or _indexed_model_name(weights, entry.get("architecture", ""))
        model_kwargs = {**entry.get("timm_kwargs", {}), **model_kwargs}
        mean = mean or entry.get("mean")
        std = std or entry.get("std")
        interpolation = interpolation or entry.get("interpolation")
        input_size = input_size or entry.get("input_size")
        weights = entry["path"]
    if not model:
        raise ConfigError("timm backbone needs 'model' (a timm model name such as 'resnet50') or indexed 'weights'")
    if net is None:
        net = _create_model(model, model_kwargs)
    if weights:
        if not Path(weights).is_file():
            raise WeightsError(f"weights file {weights} does not exist")
        _load_local(net, weights, entry)
        source = source or f"file:{weights}"
    config = dict(resolve_model_data_config(net))
    if input_size is not None:
        size = [input_size] * 2 if isinstance(input_size, int) else list(input_size)[-2:]
        config["input_size"] = (config["input_size"][0], *size)
    if not explicit_size and max_input_size is not None and max(config["input_size"][-2:]) > max_input_size:
        config["input_size"] = (config["input_size"][0], max_input_size, max_input_size)
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
    return TimmBackbone(net.eval(), data_config, rebuild, pretrained_source=source, random_init_reason=reason)


@hookimpl
def register_backbones(register):
    register(
        "timm",
        timm_backbone,
        description="Any timm model (timm.create_model); pretrained when weights can be had (hub, cache, index)",
    )
