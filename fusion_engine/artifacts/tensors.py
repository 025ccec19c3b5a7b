"""A model's tensors in and out: cloned (for saving and for best-epoch snapshots), loaded strictly.

Parsing safetensors bytes is ``safe_files.parse_safetensors``.
"""

from __future__ import annotations

import torch

from fusion_engine.artifacts.manifest import MODEL_FILE
from fusion_engine.artifacts.safe_files import state_mismatch
from fusion_engine.errors import ArtifactError


def state_tensors(module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s persistent tensors on the CPU, contiguous and unshared (as safetensors requires),
    that later training does not change; names under the module prefixes in ``skip`` are left out."""
    return {
        k: v.detach().cpu().contiguous().clone()
        for k, v in module.state_dict().items()
        if not (skip and k.startswith(skip))
    }


def load_state(model, tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = (), where: str = MODEL_FILE) -> None:
    """Load ``tensors`` strictly; module prefixes in ``skip`` (int8-packed modules) are loaded elsewhere."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)} if skip else model.state_dict()
    problem = state_mismatch(own, tensors)
    if problem:
        raise ArtifactError(f"{where} does not match the manifest's config: tensors {problem}")
    if not skip:
        model.load_state_dict(tensors, strict=True)
        return
    with torch.no_grad():  # quantised modules' own loaders expect their packed form: copy the float tensors in place
        for k, v in own.items():
            v.copy_(tensors[k])
