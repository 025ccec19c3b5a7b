"""Per-branch preprocessing as a module: channels, resize, normalise to the backbone's data config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def data_config_key(data_config: dict) -> tuple:
    """Branches whose data configs share this key can share one preprocessed input."""
    return (
        tuple(data_config["input_size"]),
        tuple(data_config["mean"]),
        tuple(data_config["std"]),
        data_config.get("interpolation", "bilinear"),
    )


class Preprocess(nn.Module):
    """Float images in [0, 1] (B, C, H, W), grey or RGB, any size -> the backbone's input."""

    def __init__(self, data_config: dict):
        super().__init__()
        channels, height, width = data_config["input_size"]
        self.size = (int(height), int(width))
        self.channels = int(channels)
        self.interpolation = data_config.get("interpolation", "bilinear")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            self.interpolation = "bilinear"
        mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)
        # (x - mean) / std as one multiply-add pass: x * scale + shift
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be (batch, channels, height, width), got shape {tuple(images.shape)}")
        if images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and self.channels == 1:
            images = images.mean(dim=1, keepdim=True)
        if tuple(images.shape[-2:]) != self.size:
            smooth = self.interpolation != "nearest"
            images = F.interpolate(
                images,
                size=self.size,
                mode=self.interpolation,
                align_corners=False if smooth else None,
                antialias=smooth,
            )
        return torch.addcmul(self.shift, images, self.scale)

    def extra_repr(self) -> str:
        return f"size={self.size}, channels={self.channels}, interpolation={self.interpolation}"
