"""A saved model folder's layout and its manifest schema: the file names, the pydantic models of
``manifest.json`` (schema-versioned, validated on load) and the reader that validates it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from fusion_engine.artifacts.safe_files import member_path
from fusion_engine.core.registry import KINDS
from fusion_engine.errors import ArtifactError, validation_message

SCHEMA_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
UNLISTED_FILES = (MANIFEST_FILE, SIGNATURE_FILE)  # files of the folder that the manifest's digests do not cover


class BranchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    feature_dim: int
    data_config: dict[str, Any]


class ComponentRecord(BaseModel):
    """A component the model uses and who offered it: the plugin, its version and the installed
    distribution that provided the plugin (None: a plugin given in code, or a manifest older than the field)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal[KINDS]  # an unknown kind is a schema error, never a KeyError in the registry
    name: str
    plugin: str
    version: str | None = None
    distribution: str | None = None


class ModuleShape(BaseModel):
    """A module whose channels were pruned: its class name, int attributes and tensor shapes after pruning."""

    model_config = ConfigDict(extra="forbid")
    type: str
    attrs: dict[str, int | list[int]] = {}
    tensors: dict[str, list[int]]


class CompressionStep(BaseModel):
    """One compression applied to the saved model (see ``compression.py``); load() replays the steps in order."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["fp16", "int8", "prune"]
    quantized: list[str] = []  # int8: names of the nn.Linear modules stored as int8 weights + per-channel scales
    pruned: dict[str, ModuleShape] = {}  # prune: module name -> its shapes after structured pruning
    info: dict[str, Any] = {}  # options and measurements; informative only, never used to rebuild


class Manifest(BaseModel):
    """Everything needed to rebuild and trust a saved fused model."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["fusion-engine-model"] = "fusion-engine-model"
    schema_version: Literal[1] = SCHEMA_VERSION
    config: dict[str, Any]
    class_names: list[str]
    branches: list[BranchRecord]
    components: list[ComponentRecord]
    handcrafted_kinds: list[str] | None = None
    shared_backbones: list[list[int]] = []  # groups of branches that run one backbone module
    encrypted: bool = False
    compression: list[CompressionStep] = []
    files: dict[str, str]
    metrics: dict[str, Any] = {}
    history: dict[str, Any] = {}
    versions: dict[str, str] = {}
    created: str = ""


def read_manifest_bytes(folder) -> bytes:
    """The bytes of ``folder``'s manifest, read once. Whoever checks them (signature) must parse these same
    bytes with :func:`parse_manifest`, never read the file again: it may have been replaced in between."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a saved model folder (it does not exist or is not a folder)")
    path = member_path(folder, MANIFEST_FILE)
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_FILE}: not a fusion-engine model folder")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None


def parse_manifest(raw: bytes, where) -> Manifest:
    """Validate the manifest bytes ``raw`` read from ``where``; ArtifactError naming every problem."""
    try:
        return Manifest.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":  # its input is the whole file: name the problem only
            problems = f"not JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}"
        else:
            problems = validation_message(exc, noun="field")
        raise ArtifactError(
            f"{where} is not a valid fusion-engine manifest (schema {SCHEMA_VERSION}): {problems}"
        ) from None
    except RecursionError:  # JSON nested deeper than the parser goes
        raise ArtifactError(f"{where} is not a valid fusion-engine manifest: nested too deeply") from None


def read_manifest(folder) -> tuple[Manifest, bytes]:
    """Parse and validate ``folder``'s manifest; ArtifactError on any problem. Returns it and the raw bytes
    it was parsed from (one read: hash or verify these bytes, not the file)."""
    raw = read_manifest_bytes(folder)
    return parse_manifest(raw, Path(folder) / MANIFEST_FILE), raw
