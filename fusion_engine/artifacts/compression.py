"""Compression of a fused model: structured channel pruning (``pruning.py``), int8 linear layers and
float16 storage (``quantization.py``).

``compress`` applies the methods to the model in memory and appends a step to ``model.compression`` for
each. ``store.save`` writes the steps into the manifest and the tensors from ``pack_tensors``, in a form
safetensors can hold; ``store.load`` builds the model from its config and ``restore`` replays the steps
(reshapes the pruned layers, swaps in the int8 layers), then loads the tensors strictly. Nothing is pickled.

Methods apply in the order prune -> int8 -> fp16; a model already compressed can take the later
methods only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusion_engine.artifacts.pruning import prune, reshape
from fusion_engine.artifacts.quantization import (
    load_fp16,
    pack_int8,
    quantize_int8,
    quiet_torch_ao,
    round_to_fp16,
    store_fp16,
    swap_in_int8,
    unpack_int8,
)
from fusion_engine.artifacts.tensors import load_state, state_tensors
from fusion_engine.core.data import align_classes, load_dataset
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import measure_feature_dims
from fusion_engine.errors import ArtifactError, ConfigError

METHODS = ("prune", "int8", "fp16")  # the order in which methods compose


# --- the recorded steps -------------------------------------------------------------------------------


def steps(model) -> list[dict]:
    """The compression steps applied to ``model`` so far (dicts as in the manifest)."""
    return list(model.compression)


def _int8_layers(step_list) -> list[str]:
    """Names of the int8 layers; their tensors are packed and loaded apart from the others."""
    return [name for s in step_list if s["method"] == "int8" for name in s["quantized"]]


def _prefixes(names) -> tuple[str, ...]:
    """The state-dict prefixes of the modules ``names``."""
    return tuple(f"{name}." for name in names)


def _check_order(model, method: str) -> None:
    done = [s["method"] for s in steps(model)]
    if method in done:
        raise ConfigError(f"this model is already compressed with {method}")
    later = [m for m in done if METHODS.index(m) > METHODS.index(method)]
    if later:
        raise ConfigError(
            f"{method} must come before {', '.join(later)}, which this model already has; "
            f"compress the uncompressed model with the methods in the order {' -> '.join(METHODS)}"
        )


def compress(
    model,
    methods,
    *,
    train=None,
    ratio: float = 0.3,
    epochs: int = 1,
    lr: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    round_to: int | None = None,
    device: str = "cpu",
    log=print,
    progress: bool = True,
) -> list[dict]:
    """Apply ``methods`` (names in any order; applied prune -> int8 -> fp16) to ``model`` in place; returns
    the steps, also appended to ``model.compression``. ``train`` and the options after it are prune's."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown compression method {m!r}; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"compression methods repeat: {methods}")
    done = []
    for method in sorted(methods, key=METHODS.index):
        _check_order(model, method)
        if method == "prune":
            step = prune(
                model,
                ratio=ratio,
                train=train,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                round_to=round_to,
                device=device,
                log=log,
                progress=progress,
            )
        elif method == "int8":
            step = quantize_int8(model)
        else:
            step = round_to_fp16(model, skip=_prefixes(_int8_layers(steps(model))))
        model.compression = [*steps(model), step]
        done.append(step)
    return done


# --- saving and loading -------------------------------------------------------------------------------


def pack_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors save() writes for a compressed model: int8 layers unpacked, float16 where asked."""
    step_list = steps(model)
    quantized = _int8_layers(step_list)
    prefixes = _prefixes(quantized)
    out = state_tensors(model, skip=prefixes)
    pack_int8(model, quantized, out)
    if any(s["method"] == "fp16" for s in step_list):
        out = store_fp16(out, skip=prefixes)  # int8 layers keep their float32 scales and biases
    return out


def restore(model, tensors: dict[str, torch.Tensor], step_list: list[dict]) -> None:
    """Replay the manifest's compression steps (dicts) on a freshly built model, then load ``tensors`` into it."""
    methods = [s["method"] for s in step_list]
    if len(set(methods)) != len(methods) or methods != sorted(methods, key=METHODS.index):
        raise ArtifactError(f"the manifest's compression steps {methods} are not in the order {' -> '.join(METHODS)}")
    tensors = dict(tensors)
    widths = [b.feature_dim for b in model.branches]
    for step in step_list:
        if step["method"] == "prune":
            reshape(model, step["pruned"])
            model.baselines = None
    quantized = _int8_layers(step_list)
    with quiet_torch_ao():
        swap_in_int8(model, quantized)
        unpack_int8(model, quantized, tensors)
    if "fp16" in methods:
        tensors = load_fp16(model, tensors)
    load_state(model, tensors, skip=_prefixes(quantized))
    if "prune" in methods:
        try:
            measured = measure_feature_dims(model)
        except Exception as e:
            raise ArtifactError(
                f"the pruned model recorded in the manifest does not run: {type(e).__name__}: {e}"
            ) from None
        if measured != widths:
            raise ArtifactError(f"the pruned model's branch widths {measured} differ from the manifest's {widths}")


# --- measuring --------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(model, data, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (no feature cache: works for every compressed form)."""
    dataset = align_classes(model, load_dataset(data))
    model.eval()
    correct = 0
    for images, labels in make_loader(dataset, model, batch_size):
        correct += int((model(images).argmax(1) == labels).sum())
    return correct / len(dataset)


def folder_bytes(folder) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


__all__ = ["METHODS", "steps", "compress", "pack_tensors", "restore", "accuracy", "folder_bytes"]
