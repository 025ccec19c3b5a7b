"""Saved models (RUN_DIR): ``model.safetensors`` + ``manifest.json`` (+ ``manifest.sig``), never pickle.

The manifest is schema-versioned and validated by pydantic on load. It records the
rebuildable config, class names, preprocessing, plugins and versions, metrics and
history, and the sha256 of every file; loading re-hashes every file, refuses any
change, missing, unlisted or escaping file, checks the signature when a public key is
given, and decrypts tensors in memory when they were saved encrypted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict

from .atomic import atomic_directory
from .errors import ArtifactError, FusionEngineError, WeightsError
from .safe_files import state_mismatch, check_finite, check_folder, member_path, sha256_file

SCHEMA_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
WEIGHT_OPTIONS = ("weights", "pretrained")  # options that fetch weights: never needed to rebuild a saved model


class BranchRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    feature_dim: int
    data_config: dict[str, Any]


class ComponentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    name: str
    plugin: str
    version: str | None = None


class ModuleShape(BaseModel):
    """A module whose channels were pruned: its class name, int attributes and tensor shapes after pruning."""

    model_config = ConfigDict(extra="forbid")
    type: str
    attrs: dict[str, int | list[int]] = {}
    tensors: dict[str, list[int]]


class CompressionStep(BaseModel):
    """One compression applied to the saved model (see ``compress.py``); load() replays the steps in order."""

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


def rebuild_config(model) -> dict:
    """The model's config with options that fetch weights removed (tensors come from the artifact)."""
    config = model.config.model_dump()
    for spec, branch in zip(config["backbones"], model.branches):
        options = {k: v for k, v in spec["options"].items() if k not in WEIGHT_OPTIONS}
        options.update(getattr(branch.backbone, "rebuild_options", None) or {})
        spec["options"] = options
        spec["label"] = spec.get("label") or branch.name  # the name came from options dropped above
    return config


def _components(model, engine) -> list[ComponentRecord]:
    used = {("fusion", model.config.fusion.name)}
    for spec in model.config.backbones:
        used |= {("backbone", spec.name), ("extractor", spec.extractor.name)}
    records = []
    for kind, name in sorted(used):
        c = engine.registry.get(kind, name) if engine else None
        records.append(ComponentRecord(kind=kind, name=name, plugin=c.plugin if c else "?", version=c.version if c else None))
    return records


def _versions() -> dict[str, str]:
    import timm

    from . import __version__

    return {"fusion_engine": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def state_tensors(model) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, contiguous and unshared (as safetensors requires)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save(model, folder, *, engine=None, metrics: dict | None = None, encryption_key: bytes | None = None,
         signing_key=None) -> Path:
    """Write the model to ``folder`` atomically: the old content stays intact until the new is complete."""
    from safetensors.torch import save as safetensors_bytes

    from .encryption import encrypt_tensors

    if model.class_names is None:
        raise ArtifactError("the model has no class names yet; fit it (or build it with class_names) before saving")
    if engine is None:
        from .engine import Engine

        engine = Engine.from_plugins()
    folder = Path(folder)
    steps = model.extras.get("compression") or []
    if steps:
        from .compress import pack_tensors

        tensors = pack_tensors(model)
    else:
        tensors = state_tensors(model)
    data = encrypt_tensors(tensors, encryption_key, MODEL_FILE) if encryption_key else safetensors_bytes(tensors)
    baselines = getattr(model, "baselines", None)
    with atomic_directory(folder) as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        manifest = Manifest(
            config=rebuild_config(model), class_names=model.class_names,
            branches=[BranchRecord(name=b.name, feature_dim=b.feature_dim,
                                   data_config={k: list(v) if isinstance(v, tuple) else v
                                                for k, v in b.backbone.data_config.items()})
                      for b in model.branches],
            components=_components(model, engine),
            handcrafted_kinds=list(baselines.kinds) if baselines is not None else None,
            shared_backbones=model.shared_backbone_groups(),
            encrypted=bool(encryption_key), compression=steps, files={MODEL_FILE: sha256_file(tmp / MODEL_FILE)},
            metrics=metrics or model.extras.get("metrics", {}), history=model.extras.get("history", {}),
            versions=_versions(), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(), indent=2, default=str))
        if signing_key:
            from .signing import sign_manifest

            sign_manifest(tmp, signing_key)
    return folder


def read_manifest(folder) -> tuple[Manifest, bytes]:
    """Parse and validate ``folder/manifest.json``; ArtifactError on any problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a saved model folder (it does not exist or is not a folder)")
    path = member_path(folder, MANIFEST_FILE)
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_FILE}: not a fusion-engine model folder")
    raw = path.read_bytes()
    try:
        return Manifest.model_validate_json(raw), raw
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5])
        raise ArtifactError(f"{path} is not a valid fusion-engine manifest (schema {SCHEMA_VERSION}): {problems}") from None


def verify(folder, public_key=None) -> Manifest:
    """Check the signature (when ``public_key`` is given) and every file's digest."""
    if not Path(folder).is_dir():
        raise ArtifactError(f"{folder} is not a saved model folder (it does not exist or is not a folder)")
    member_path(folder, SIGNATURE_FILE)  # a symlinked signature is refused like any other link
    if public_key is not None:
        from .signing import verify_manifest

        verify_manifest(folder, public_key)
    manifest, _ = read_manifest(folder)
    if MODEL_FILE not in manifest.files:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {MODEL_FILE}; the artifact is incomplete or was edited")
    check_folder(folder, manifest.files)
    return manifest


def _check_plugins(manifest: Manifest, engine) -> None:
    for c in manifest.components:
        if c.name not in engine.registry.names(c.kind):
            raise ArtifactError(
                f"this model needs {c.kind} '{c.name}' from plugin '{c.plugin}'"
                + (f" (version {c.version})" if c.version else "")
                + ", which is not installed; install that plugin package (see `fusion-engine list`)")


def load(folder, *, engine=None, public_key=None, encryption_key: bytes | None = None):
    """Rebuild a saved FusedClassifier after checking integrity (and signature, with ``public_key``)."""
    folder = Path(folder)
    manifest = verify(folder, public_key)
    if engine is None:
        from .engine import Engine

        engine = Engine.from_plugins()
    _check_plugins(manifest, engine)
    # Read the bytes once and parse exactly what was hashed: the file cannot be swapped after verification.
    data = member_path(folder, MODEL_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.files[MODEL_FILE]:
        raise ArtifactError(f"{MODEL_FILE!r} was modified: sha256 differs from the one recorded in the manifest")
    if manifest.encrypted:
        from .encryption import decrypt_tensors, load_key

        key = encryption_key or load_key()
        tensors = decrypt_tensors(data, key, MODEL_FILE)
    else:
        tensors = _parse_safetensors(data, folder / MODEL_FILE)
    del data
    check_finite(tensors, MODEL_FILE)
    model = _rebuild(manifest, engine)
    if manifest.compression:
        from .compress import restore

        restore(model, tensors, manifest.compression)
    else:
        _load_state(model, tensors)
    model.extras.update(metrics=manifest.metrics, history=manifest.history, manifest=manifest)
    if manifest.compression:
        model.extras["compression"] = [step.model_dump() for step in manifest.compression]
    return model.eval()


def _parse_safetensors(data: bytes, path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors_bytes

    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OverflowError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file: {e}") from None


def _rebuild(manifest: Manifest, engine):
    """The untrained model of the manifest's config; a config that cannot be built is an ArtifactError."""
    from .baselines import Baselines

    try:
        model = engine.build(manifest.config, class_names=manifest.class_names)
        model.share_backbones(manifest.shared_backbones)
        if manifest.handcrafted_kinds is not None:
            model.baselines = Baselines([b.feature_dim for b in model.branches], model.num_classes,
                                        manifest.handcrafted_kinds)
    except FusionEngineError as e:
        raise ArtifactError(f"cannot rebuild the model described by {MANIFEST_FILE}: {e}") from None
    except Exception as e:  # the manifest is untrusted input: whatever a plugin raises on it is reported, not a crash
        raise ArtifactError(f"cannot rebuild the model described by {MANIFEST_FILE}: {type(e).__name__}: {e}") from None
    recorded = [(b.name, b.feature_dim) for b in manifest.branches]
    built = [(b.name, b.feature_dim) for b in model.branches]
    if recorded != built:
        raise ArtifactError(f"{MANIFEST_FILE} is inconsistent: its branches {recorded} differ from those its config "
                            f"builds {built}")
    return model


def _load_state(model, tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Load ``tensors`` strictly; module prefixes in ``skip`` (int8-packed modules) are loaded elsewhere."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)} if skip else model.state_dict()
    problem = state_mismatch(own, tensors)
    if problem:
        raise ArtifactError(f"{MODEL_FILE} does not match the manifest's config: tensors {problem}")
    if not skip:
        model.load_state_dict(tensors, strict=True)
        return
    with torch.no_grad():  # quantised modules' own loaders expect their packed form: copy the float tensors in place
        for k, v in own.items():
            v.copy_(tensors[k])
