"""Every timm family gives its real features: the default extractor's width is timm's ``num_features``.

A sample of timm's zoo (the smallest model of each family, random weights via ``"pretrained": false``, one
small image each): CNNs (NCHW maps), Swin-style models that work channels-last (``output_fmt = "NHWC"``),
and transformers (tokens with and without a class token). Where timm's own head is a plain global average
(no norm or MLP after the pooling), the branch's features must equal ``forward_head(x, pre_logits=True)``.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from fusion_engine import Engine, hookimpl
from fusion_engine.errors import RandomInitWarning

# (model, input size, model_kwargs, timm's pre-logits features are the plain average of forward_features)
FAMILIES = [
    ("resnet18", 64, {}, True),
    ("efficientnet_b0", 64, {}, True),
    ("mobilenetv3_small_100", 64, {}, False),  # timm's head adds a 1x1 conv (1024 wide) after pooling
    ("mobilenetv4_conv_small", 64, {}, False),
    ("convnext_atto", 64, {}, False),  # norm after pooling
    ("regnetx_002", 64, {}, True),
    ("ghostnet_100", 64, {}, False),
    ("densenet121", 64, {}, True),
    ("inception_v3", 75, {}, True),
    ("xception41", 71, {}, True),
    ("vgg11", 32, {}, False),  # timm's pre-logits is a 4096-wide MLP
    ("hgnetv2_b0", 64, {}, False),
    ("repvit_m1", 64, {}, True),
    ("efficientvit_b0", 64, {}, False),
    ("fastvit_t8", 64, {}, True),
    ("mobilevit_xxs", 64, {}, True),
    ("edgenext_xx_small", 64, {}, False),
    ("coatnet_nano_rw_224", 64, {"img_size": 64}, True),
    ("maxvit_nano_rw_256", 64, {"img_size": 64}, True),
    ("pvt_v2_b0", 64, {}, True),
    ("focalnet_tiny_srf", 64, {}, True),
    ("caformer_s18", 64, {}, False),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}, False),  # class token; the default extractor averages patches
    ("deit_tiny_patch16_224", 64, {"img_size": 64}, False),
    ("eva02_tiny_patch14_224", 56, {"img_size": 56}, False),
    ("levit_128s", 64, {"img_size": 64}, True),  # tokens without a class token
    ("swin_tiny_patch4_window7_224", 64, {"img_size": 64}, True),  # NHWC
    ("swinv2_tiny_window8_256", 64, {"img_size": 64}, True),  # NHWC
    ("swinv2_cr_tiny_ns_224", 64, {"img_size": 64}, True),  # NCHW, unlike Swin
    ("mambaout_femto", 64, {}, False),  # NHWC
    ("sequencer2d_s", 64, {}, True),  # NHWC
]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_plugins(entry_points=False)


def build(engine, model: str, size: int, kwargs: dict, extractor="avg"):
    config = {
        "backbones": [
            {
                "name": "timm",
                "model": model,
                "pretrained": False,
                "input_size": size,
                "model_kwargs": kwargs,
                "extractor": extractor,
            }
        ],
        "num_classes": 3,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)  # random on purpose: no warning
        return engine.build(config).eval()


def normalised(backbone, size: int) -> torch.Tensor:
    torch.manual_seed(0)
    mean = torch.tensor(backbone.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(backbone.data_config["std"]).view(1, -1, 1, 1)
    return (torch.rand(1, 3, size, size) - mean) / std


def test_the_sample_covers_twenty_families():
    assert len({name.split("_")[0] for name, *_ in FAMILIES}) >= 20
    assert all(timm.is_model(name) for name, *_ in FAMILIES)


@pytest.mark.parametrize("model, size, kwargs, plain_average", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_default_extractor_gives_timms_num_features(engine, model, size, kwargs, plain_average):
    fused = build(engine, model, size, kwargs)
    branch = fused.branches[0]
    timm_model = branch.backbone.model
    assert branch.feature_dim == timm_model.num_features
    assert branch.backbone.pretrained_source is None
    x = normalised(branch.backbone, size)
    with torch.no_grad():
        features = branch(x)
        assert features.shape == (1, timm_model.num_features)
        assert fused(torch.rand(1, 3, size, size)).shape == (1, 3)
        if plain_average:  # pooled over the right axes: exactly what timm's own head pools
            expected = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
            torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "extractor, width", [("max", 768), ("avgmax", 2 * 768), ("gem", 768), ({"name": "multiscale", "stages": 2}, None)]
)
def test_every_pooling_respects_swins_channels_last_layout(engine, extractor, width):
    fused = build(engine, "swin_tiny_patch4_window7_224", 64, {"img_size": 64}, extractor=extractor)
    backbone = fused.branches[0].backbone
    assert backbone.model.output_fmt == "NHWC"
    x = normalised(backbone, 64)
    with torch.no_grad():
        raw = backbone.model.forward_features(x)  # (1, 2, 2, 768): channels last
        assert backbone(x).shape == (1, 768, 2, 2)  # the backbone hands on NCHW maps
        torch.testing.assert_close(backbone(x), raw.permute(0, 3, 1, 2))
        stages = backbone.forward_stages(x)
    assert all(s.dim() == 4 and s.shape[1] in (96, 192, 384, 768) for s in stages)
    assert stages[-1].shape == (1, 768, 2, 2)
    if width is None:  # multiscale: the last two stages, pooled per channel
        width = stages[-2].shape[1] + stages[-1].shape[1]
    assert fused.branches[0].feature_dim == width
    if extractor == "max":
        torch.testing.assert_close(fused.branches[0](x), raw.amax(dim=(1, 2)))


class ChannelsLast(nn.Module):
    """A plugin backbone that returns (B, H, W, C) maps and says so with ``output_fmt``."""

    output_fmt = "NHWC"
    feature_dim = 5
    data_config = {"input_size": (3, 8, 8), "mean": (0.0,) * 3, "std": (1.0,) * 3, "interpolation": "bilinear"}

    def forward(self, x):
        b = x.shape[0]
        return torch.arange(5.0).repeat(b, 4, 4, 1) + x.mean(dim=(1, 2, 3)).view(b, 1, 1, 1)


class ChannelsLastPlugin:
    @hookimpl
    def register_backbones(self, register):
        register("channels_last", ChannelsLast)


@pytest.mark.parametrize("extractor", ["avg", "max", "gem"])
def test_extractors_read_a_plugin_backbones_declared_layout(extractor):
    engine = Engine.from_plugins([ChannelsLastPlugin()], entry_points=False)
    fused = engine.build({"backbones": [{"name": "channels_last", "extractor": extractor}], "num_classes": 2})
    assert fused.branches[0].feature_dim == 5  # pooled over H and W, not over the channels
    with torch.no_grad():
        features = fused.branches[0](torch.zeros(1, 3, 8, 8))
    torch.testing.assert_close(features, torch.arange(5.0).view(1, 5), atol=1e-4, rtol=1e-4)
