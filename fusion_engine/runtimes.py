"""Ways to run a fused model for inference: eager, channels_last, bf16 autocast, torch.compile, ONNX Runtime.

``make_runner(model, runtime)`` returns ``run(images) -> logits`` (images: float (B, C, H, W) in [0, 1]).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

RUNTIMES = ("eager", "channels_last", "bf16", "bf16_channels_last", "compile", "onnx")


def make_runner(model, runtime: str = "eager", *, example=None):
    """A callable for ``runtime``; ``example`` images are needed by 'onnx' (export) only."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}'; valid: {', '.join(RUNTIMES)}")
    model = model.eval()
    if runtime == "onnx":
        from .export import onnx_runner

        return onnx_runner(model, example)
    memory_format = torch.channels_last if runtime.endswith("channels_last") else torch.contiguous_format
    if memory_format is torch.channels_last:
        model = model.to(memory_format=memory_format)
    device_type = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if runtime.startswith("bf16") \
        else contextlib.nullcontext
    forward = torch.compile(model) if runtime == "compile" else model

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return forward(images.contiguous(memory_format=memory_format)).float()

    return run
