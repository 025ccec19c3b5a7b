"""The branches' input size follows the data: small images are upsampled only as far as it pays.

Pretrained CNNs see 160-224 px; an 8-32 px image resized to 224 px costs up to 50x the compute of
the same image at 32 px. Measured on CIFAR-10 (32 px) and USPS (16 px) with the default model's
three MobileNets (docs/benchmarks.md, "Input size follows the data"): held-out accuracy stops
rising at about UPSCALE times the images' own side, so a branch's input is capped there. An
explicit ``input_size`` in a config always wins; ``max_input_size`` only lowers a model's own size.
"""

from __future__ import annotations

import math

import numpy as np

from fusion_engine.core.config import BackboneSpec, parse_config

UPSCALE = 5  # the cap, as a multiple of the images' side
SIZE_STEP = 32  # caps are rounded up to a multiple of this (what CNN strides divide)
SAMPLED_IMAGES = 32  # images read to find the data's typical side
SIZED_BACKBONES = ("timm",)  # backbones that take max_input_size


def image_side(dataset) -> int:
    """The data's typical image side in px: the median longer side of up to SAMPLED_IMAGES images."""
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, min(n, SAMPLED_IMAGES)).astype(int))
    return int(np.median([max(dataset[int(i)][0].shape[-2:]) for i in picks]))


def max_input_size(side: int) -> int:
    """The largest branch input size worth computing for images of ``side`` px."""
    return SIZE_STEP * math.ceil(UPSCALE * side / SIZE_STEP)


def sized_to_data(config, dataset) -> dict:
    """``config`` (dict, file or FusedModelConfig) as a dict in which every timm branch that sets no
    ``input_size`` (nor ``max_input_size``) gets ``max_input_size`` from the data's image side."""
    parsed = parse_config(config).model_dump()
    cap = max_input_size(image_side(dataset))
    parsed["backbones"] = [sized_spec(spec, cap) for spec in parsed["backbones"]]
    return parsed


def sized_spec(spec, cap: int):
    """One backbone spec (any form a config takes): with ``max_input_size=cap`` (as a dict of the full form) when
    it is a timm branch that sets no ``input_size`` nor ``max_input_size``; else ``spec`` itself."""
    parsed = BackboneSpec.model_validate(spec).model_dump()
    options = parsed["options"]
    if parsed["name"] not in SIZED_BACKBONES or "input_size" in options or "max_input_size" in options:
        return spec
    options["max_input_size"] = cap
    return parsed
