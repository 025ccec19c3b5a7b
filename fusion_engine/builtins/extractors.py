"""Feature extractors: backbone output (map, tokens or vector) -> one vector per image."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fusion_engine.plugin_api import hookimpl


def _nhwc(backbone: nn.Module) -> bool:
    """Whether the backbone declares channels-last maps (``output_fmt = "NHWC"``, as timm's Swin does)."""
    return str(getattr(backbone, "output_fmt", "NCHW")).upper() == "NHWC"


def _pool(
    x: torch.Tensor, how: str, prefix_tokens: int = 0, p: torch.Tensor | None = None, nhwc: bool = False
) -> torch.Tensor:
    """Pool a (B, C, H, W) map ((B, H, W, C) when ``nhwc``), (B, N, C) tokens or pass a (B, D) vector through."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:  # tokens: pool over the patch tokens
        x = x[:, prefix_tokens:].transpose(1, 2)  # (B, C, N)
    elif nhwc:
        x = x.flatten(1, 2).transpose(1, 2)  # (B, C, H*W)
    else:
        x = x.flatten(2)  # (B, C, H*W)
    if how == "avg":
        return x.mean(dim=2)
    if how == "max":
        return x.amax(dim=2)
    if how == "avgmax":
        return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)
    if how == "gem":
        return x.clamp(min=1e-6).pow(p).mean(dim=2).pow(1.0 / p)
    raise ValueError(f"unknown pooling '{how}'; valid: avg, max, avgmax, gem")


class Pool(nn.Module):
    """Global pooling over space (maps) or patch tokens (transformers)."""

    def __init__(self, backbone: nn.Module, how: str):
        super().__init__()
        self.how = how
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.nhwc = _nhwc(backbone)

    def forward(self, x):
        return _pool(x, self.how, self.prefix_tokens, nhwc=self.nhwc)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): p=1 is average, large p approaches max."""

    def __init__(self, backbone: nn.Module, p: float, learnable: bool):
        super().__init__()
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.nhwc = _nhwc(backbone)
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)

    def forward(self, x):
        return _pool(x, "gem", self.prefix_tokens, self.p, nhwc=self.nhwc)


class MultiScale(nn.Module):
    """Pool the last ``stages`` stage outputs and concatenate them."""

    uses_stages = True

    def __init__(self, backbone: nn.Module, stages: int, pool: str):
        super().__init__()
        self.stages = stages
        self.how = pool
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)

    def forward(self, outputs: list[torch.Tensor]):
        return torch.cat([_pool(x, self.how, self.prefix_tokens) for x in outputs[-self.stages :]], dim=1)


class Token(nn.Module):
    """The class token or the mean of the patch tokens of a transformer backbone."""

    def __init__(self, backbone: nn.Module, token: str):
        super().__init__()
        self.token = token
        self.prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        if token == "cls" and self.prefix_tokens == 0:
            raise ValueError("this backbone has no class token; use token='mean' or the 'avg' extractor")

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError(
                f"extractor 'token' needs transformer tokens (B, N, C), got shape {tuple(x.shape)}; "
                "use 'avg' for convolutional backbones"
            )
        return x[:, 0] if self.token == "cls" else x[:, self.prefix_tokens :].mean(dim=1)


def avg(backbone):
    return Pool(backbone, "avg")


def max_pool(backbone):
    return Pool(backbone, "max")


def avgmax(backbone):
    return Pool(backbone, "avgmax")


def gem(backbone, p: float = 3.0, learnable: bool = False):
    if p <= 0:
        raise ValueError(f"GeM needs p > 0, got {p}")
    return GeM(backbone, p, learnable)


def multiscale(backbone, stages: int = 3, pool: Literal["avg", "max", "avgmax"] = "avg"):
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if not hasattr(backbone, "forward_stages"):
        raise ValueError("this backbone does not expose forward_stages(); use a single-scale extractor")
    return MultiScale(backbone, stages, pool)


def token(backbone, token: Literal["cls", "mean"] = "cls"):
    return Token(backbone, token)


@hookimpl
def register_extractors(register):
    register("avg", avg, description="Global average pooling (maps) / mean of patch tokens")
    register("max", max_pool, description="Global max pooling")
    register("avgmax", avgmax, description="Average and max pooling concatenated")
    register("gem", gem, description="Generalised-mean pooling, p learnable or fixed")
    register("multiscale", multiscale, description="Last N stages pooled and concatenated")
    register("token", token, description="Transformer class token or mean patch token")
