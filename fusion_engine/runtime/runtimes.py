"""Ways to run a fused model for inference: torch (float32, NCHW), channels_last, bf16 autocast, torch.compile,
ONNX Runtime in float32 (onnx) or static int8 (int8). Every place that names a runtime uses these names;
"torch" is plain eager PyTorch.

``make_runner(model, runtime)`` returns ``run(images) -> logits`` (images: float (B, C, H, W) in [0, 1]).
"""

from __future__ import annotations

import contextlib

import torch

from fusion_engine.errors import ConfigError

RUNTIMES = ("torch", "channels_last", "bf16", "bf16_channels_last", "compile", "onnx", "int8")
ALIASES = {"eager": "torch"}  # the name bench used before 0.2; still accepted


def autocast(device, precision: str = "fp32"):
    """bfloat16 autocast on ``device`` for precision 'bf16', else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"unknown precision '{precision}'; valid: fp32, bf16")
    return contextlib.nullcontext()


@contextlib.contextmanager
def fast_memory_format(model: torch.nn.Module, device):
    """Yield the memory format extraction should feed ``model``: channels_last for convolutional
    models on the CPU (1.3-1.8x faster than NCHW for ResNets and MobileNets here; see
    docs/benchmarks.md), with the model converted for the duration and restored afterwards;
    contiguous NCHW on GPUs (channels_last measured 4x slower there for depthwise convolutions)."""
    convolutional = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if torch.device(device).type != "cpu" or not convolutional:
        yield torch.contiguous_format
        return
    with torch.inference_mode(False):  # parameters stay normal tensors, trainable afterwards
        model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        with torch.inference_mode(False):
            model.to(memory_format=torch.contiguous_format)


def runtime_name(runtime: str) -> str:
    """``runtime`` checked against RUNTIMES (older aliases mapped); ConfigError naming the valid ones."""
    runtime = ALIASES.get(runtime, runtime)
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}'; valid: {', '.join(RUNTIMES)}")
    return runtime


def make_runner(model, runtime: str = "torch", *, example=None, calibration=None):
    """A callable for ``runtime``; ``example`` images are needed by 'onnx' and 'int8' (export) only, and
    ``calibration`` (data ``load_dataset`` takes) by 'int8'."""
    runtime = runtime_name(runtime)
    model = model.eval()
    if runtime in ("onnx", "int8"):
        from fusion_engine.runtime.export import onnx_runner

        if runtime == "int8" and calibration is None:
            raise ConfigError("runtime 'int8' calibrates on real images: give the data (bench --data DATA)")
        return onnx_runner(model, example, calibration if runtime == "int8" else None)
    memory_format = torch.channels_last if runtime.endswith("channels_last") else torch.contiguous_format
    if memory_format is torch.channels_last:
        model = model.to(memory_format=memory_format)
    device = next(model.parameters()).device
    precision = "bf16" if runtime.startswith("bf16") else "fp32"
    forward = torch.compile(model) if runtime == "compile" else model

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return forward(images.contiguous(memory_format=memory_format)).float()

    return run
