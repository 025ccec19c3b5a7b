"""Finding, reading and checking CIFAR ResNet weight files."""

import os
import re
from pathlib import Path

import torch
from torch import nn

from fusion_engine.plugin_api import WEIGHTS_ENV_VAR as ENV_VAR
from fusion_engine.plugin_api import WeightsError, load_weights_file, weights_dirs

from .model import DEPTHS

PRETRAINED_FILES = {
    "resnet20": "resnet20_cifar10_akamaster.safetensors",
    "resnet56": "resnet56_cifar10_akamaster.safetensors",
}


def pretrained_path(model: str) -> Path:
    """The published weights of ``model``, from the folder(s) in $FUSION_ENGINE_WEIGHTS_DIR."""
    if model not in PRETRAINED_FILES:
        raise WeightsError(
            f"no pretrained weights are published for {model} (only for "
            f"{', '.join(PRETRAINED_FILES)}); pass weights=PATH to a state dict of your own"
        )
    file = PRETRAINED_FILES[model]
    folders = weights_dirs()
    for folder in folders:
        if (folder / file).is_file():
            return folder / file
    where = f"not in {ENV_VAR}={os.environ[ENV_VAR]!r}" if folders else f"{ENV_VAR} is not set"
    raise WeightsError(
        f"pretrained weights for {model} not found ({file}: {where}). Either pass the file in the backbone "
        f'config, {{"name": "cifar_resnet", "model": "{model}", "weights": "PATH/{file}"}} '
        f"(weights=PATH in Python), or set {ENV_VAR} to the folder holding {file}, "
        f"e.g. export {ENV_VAR}=../shared/weights"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors or (weights-only) .pt/.pth state dict, floats as float32, "module." prefixes dropped."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path}")
    state = load_weights_file(path)  # the engine's reader: never runs pickled code
    # akamaster trained under DataParallel, hence its checkpoints' "module." prefix
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    # BatchNorm's num_batches_tracked counter is not shipped and not needed for inference
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def load_weights(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Load ``path`` into ``model`` (a CIFAR ResNet ``name``), requiring every key and shape to match."""
    state = read_state_dict(path)
    got, want = _shapes(state), _shapes(model.state_dict())
    if got != want:
        blocks = {m[1] for k in got if (m := re.fullmatch(r"layer1\.(\d+)\.conv1\.weight", k))}
        if blocks and len(blocks) != DEPTHS[name]:
            raise WeightsError(
                f"weights file {path} holds a ResNet-{6 * len(blocks) + 2} ({len(blocks)} blocks per stage), "
                f"not a {name}: choose the matching model or file"
            )
        missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
        raise WeightsError(
            f"weights file {path} does not fit {name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
