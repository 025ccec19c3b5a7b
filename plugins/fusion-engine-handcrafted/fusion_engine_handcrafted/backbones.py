"""Classic descriptors as backbones: a non-neural branch that fuses like any other.

Each backbone asks the engine for the plain image in [0, 1] (mean 0, std 1) resized to
``size`` x ``size`` and returns one descriptor vector per image, computed with the public
functions of :mod:`fusion_engine.core.handcrafted`. The pooling extractors (``avg``, the
default) pass such vectors through unchanged. The backbones have no parameters and no
state: nothing to train, nothing in the state dict, and no gradient flows through them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import numpy as np
import torch
from torch import nn

from fusion_engine.plugin_api import FEATURE_KINDS, ConfigError, color_histogram, hog_features, lbp_histogram

KINDS = tuple(FEATURE_KINDS)  # "hog", "color", "lbp"
Kind = Literal["hog", "color", "lbp"]
MIN_SIZE = 8


class HandcraftedBackbone(nn.Module):
    """Images ``(B, C, size, size)`` in [0, 1] -> descriptors ``(B, feature_dim)``.

    ``descriptors`` maps a name to a function ``images -> float32 ndarray (N, D)``; their
    outputs are concatenated in order. The descriptors run on the CPU (as
    :mod:`fusion_engine.core.handcrafted` does); the result comes back on the input's device and
    in its floating dtype, so the module works inside a fused model on any device.
    """

    def __init__(self, descriptors: dict[str, Callable], size: int):
        super().__init__()
        self.descriptors = dict(descriptors)
        self.kinds = tuple(self.descriptors)
        self.size = int(size)
        self.data_config = {
            "input_size": (3, self.size, self.size),
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "interpolation": "bilinear",
        }
        probe = torch.zeros(1, 3, self.size, self.size)
        self.feature_dims = {name: int(fn(probe).shape[1]) for name, fn in self.descriptors.items()}
        self.feature_dim = sum(self.feature_dims.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (batch, channels, height, width), got shape {tuple(x.shape)}")
        # bilinear resizing keeps [0, 1]; clamp away float rounding that the descriptors would reject
        images = x.detach().float().clamp(0, 1).cpu()
        features = np.concatenate([fn(images) for fn in self.descriptors.values()], axis=1)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.from_numpy(features).to(device=x.device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"kinds={list(self.kinds)}, size={self.size}, feature_dim={self.feature_dim}"


def _build(name: str, descriptors: dict[str, Callable], size: int) -> HandcraftedBackbone:
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(
            f"{name}: size must be an integer >= {MIN_SIZE} (the side the image is resized to), got {size!r}"
        )
    try:
        return HandcraftedBackbone(descriptors, size)
    except ConfigError as exc:  # a descriptor's own parameter check; a ValueError names the backbone in the engine
        raise ValueError(f"{name}: {exc}") from None


def hog_backbone(size: int = 32, cell: int = 8, block: int = 2, bins: int = 9) -> HandcraftedBackbone:
    """Histograms of oriented gradients of the grey image at ``size`` x ``size`` (324 values by default)."""
    return _build("hog", {"hog": partial(hog_features, size=size, cell=cell, block=block, bins=bins)}, size)


def color_histogram_backbone(size: int = 32, bins: int = 8) -> HandcraftedBackbone:
    """Per-channel RGB histograms, ``bins`` bins each (3 * bins values), of the image at ``size`` x ``size``."""
    return _build("color_histogram", {"color": partial(color_histogram, bins=bins)}, size)


def lbp_backbone(size: int = 32, grid: int = 2) -> HandcraftedBackbone:
    """Uniform LBP histograms on a ``grid`` x ``grid`` grid of the grey image at ``size`` x ``size`` (grid**2 * 59 values)."""
    return _build("lbp", {"lbp": partial(lbp_histogram, size=size, grid=grid)}, size)


def handcrafted_backbone(kinds: list[Kind] = ["hog", "color"], size: int = 32) -> HandcraftedBackbone:  # noqa: B006
    """Several descriptors concatenated, each with its default parameters, at ``size`` x ``size``.

    ``kinds`` lists ``"hog"``, ``"color"`` and/or ``"lbp"`` (each at most once, in the output's
    order). At ``size=32`` the features equal ``fusion_engine.core.handcrafted.handcrafted_features(images, kinds=kinds)``.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(
            f"handcrafted: kinds must list one or more of {', '.join(KINDS)}; "
            + (f"unknown: {', '.join(map(repr, unknown))}" if unknown else "got an empty list")
        )
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ValueError(
            f"handcrafted: kinds lists {', '.join(map(repr, repeated))} more than once; name each kind once"
        )
    functions = {
        "hog": partial(hog_features, size=size),
        "color": color_histogram,
        "lbp": partial(lbp_histogram, size=size),
    }
    return _build("handcrafted", {k: functions[k] for k in kinds}, size)
