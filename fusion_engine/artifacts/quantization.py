"""Storage compression: float16 tensors and int8 linear layers, applied in memory, packed for saving,
unpacked on load. ``compression.py`` checks the order of the methods and records the steps.

- ``fp16``: every float32 tensor is stored as float16 (those beyond float16's range stay float32).
  Load casts them back to float32, so CPU inference runs in float32 as before: the file halves,
  the accuracy changes only by float16 rounding, latency does not change.
- ``int8``: every ``nn.Linear`` becomes a torch.ao dynamically quantised linear layer (int8
  weights, symmetric per-output-channel scales, activations quantised on the fly). Stored as
  plain tensors ``<layer>.weight_int8`` (int8), ``<layer>.weight_scale`` (float32),
  ``<layer>.weight_zero_point`` (int64) and ``<layer>.bias``.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from fusion_engine.errors import ArtifactError, ConfigError

FP16_MAX = 65504.0
KEEP_FLOAT_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


# --- fp16 -------------------------------------------------------------------------------------------


def fits_fp16(t: torch.Tensor) -> bool:
    """Whether ``t`` is float32 and within float16's range (so storing it as float16 only rounds it)."""
    return t.dtype == torch.float32 and (t.numel() == 0 or float(t.abs().max()) <= FP16_MAX)


def round_to_fp16(model, skip: tuple[str, ...] = ()) -> dict:
    """Round every float32 tensor (outside the module prefixes in ``skip``) to float16 precision now; the
    returned step makes save() store them as float16."""
    rounded, kept = 0, []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or (skip and name.startswith(skip)):
                continue
            if fits_fp16(t):
                t.copy_(t.half().float())
                rounded += 1
            else:
                kept.append(name)
    return {
        "method": "fp16",
        "info": {
            "stored_dtype": "float16",
            "compute_dtype": "float32",
            "tensors_float16": rounded,
            "kept_float32": kept,
        },
    }


def store_fp16(tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``tensors`` with those that fit float16 cast to it, except under the module prefixes in ``skip``."""
    return {k: v.half() if fits_fp16(v) and not (skip and k.startswith(skip)) else v for k, v in tensors.items()}


def load_fp16(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with the float16 ones that ``model`` holds as float32 cast back to float32."""
    own = model.state_dict()
    return {
        k: v.float() if v.dtype == torch.float16 and k in own and own[k].dtype == torch.float32 else v
        for k, v in tensors.items()
    }


# --- int8 -------------------------------------------------------------------------------------------


def quantize_int8(model) -> dict:
    """Swap every nn.Linear for a dynamically quantised int8 linear layer (per-channel weights)."""
    model.eval()
    # torch's transformer layers read their linear layers' .weight directly (fast path): those stay float
    keep_float = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, KEEP_FLOAT_PARENTS)
        for c, _ in m.named_children()
    }
    eligible = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep_float]
    if not eligible:
        raise ConfigError("int8: this model has no nn.Linear layers that can be quantised")
    with quiet_torch_ao():
        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in eligible}, dtype=torch.qint8, inplace=True)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QLinear))
    return {
        "method": "int8",
        "quantized": names,
        "info": {
            "scheme": "torch.ao dynamic, qint8 weights, per-channel symmetric",
            "layers": len(names),
            "kept_float": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear),
        },
    }


@contextlib.contextmanager
def quiet_torch_ao():
    """torch marks torch.ao quantisation deprecated (pytorch/pytorch#184982; successor: torchao). It still works,
    and the warnings would print on every load of an int8 model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        yield


def swap_in_int8(model, names) -> None:
    """Replace the Linear layers ``names`` of a freshly built model by empty int8 layers of the same shape."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        layer = getattr(parent, attr, None) if parent is not None else None
        if type(layer) is not nn.Linear:
            raise ArtifactError(f"the manifest's int8 layer {name!r} is not a Linear layer of the rebuilt model")
        setattr(
            parent,
            attr,
            QLinear(layer.in_features, layer.out_features, bias_=layer.bias is not None, dtype=torch.qint8),
        )


def pack_int8(model, names, out: dict) -> None:
    """Add the int8 layers ``names`` to ``out`` as plain tensors (int8 weights, scales, zero points, bias)."""
    for name in names:
        weight, bias = model.get_submodule(name)._weight_bias()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        else:
            scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float64)
            zero_point = torch.full((weight.shape[0],), weight.q_zero_point(), dtype=torch.int64)
        out[f"{name}.weight_int8"] = weight.int_repr().contiguous().clone()
        out[f"{name}.weight_scale"] = scale.to(torch.float32).contiguous().clone()
        out[f"{name}.weight_zero_point"] = zero_point.to(torch.int64).contiguous().clone()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().float().contiguous().clone()


def unpack_int8(model, names, tensors: dict) -> None:
    """Load the int8 layers ``names`` from the plain tensors of :func:`pack_int8`, popping them from ``tensors``."""
    for name in names:
        layer = model.get_submodule(name)
        out_f, in_f = layer.out_features, layer.in_features
        expected = {
            f"{name}.weight_int8": ((out_f, in_f), torch.int8),
            f"{name}.weight_scale": ((out_f,), torch.float32),
            f"{name}.weight_zero_point": ((out_f,), torch.int64),
        }
        if layer.bias() is not None:
            expected[f"{name}.bias"] = ((out_f,), torch.float32)
        for key, (shape, dtype) in expected.items():
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                found = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ArtifactError(f"int8 tensor {key!r} is {found}; expected {shape} {dtype}")
        scale = tensors.pop(f"{name}.weight_scale")
        if not bool((scale > 0).all()):
            raise ArtifactError(f"int8 tensor '{name}.weight_scale' has non-positive scales")
        weight = torch._make_per_channel_quantized_tensor(
            tensors.pop(f"{name}.weight_int8"), scale.double(), tensors.pop(f"{name}.weight_zero_point"), 0
        )
        layer.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
