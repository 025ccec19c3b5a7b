"""Saved models (RUN_DIR): ``model.safetensors`` + ``manifest.json`` (+ ``manifest.sig``), never pickle.

The manifest is schema-versioned and validated by pydantic on load. It records the
rebuildable config, class names, preprocessing, plugins and versions, metrics and
history, and the sha256 of every file; loading re-hashes every file, refuses any
change, missing, unlisted or escaping file, checks the signature when a public key is
given, and decrypts tensors in memory when they were saved encrypted. The file names and the
manifest's schema are in ``manifest.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path

import timm
import torch
from safetensors.torch import save as safetensors_bytes

from fusion_engine.artifacts.atomic import atomic_directory
from fusion_engine.artifacts.compression import pack_tensors, restore
from fusion_engine.artifacts.encryption import decrypt_tensors, encrypt_tensors, load_key
from fusion_engine.artifacts.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    UNLISTED_FILES,
    BranchRecord,
    ComponentRecord,
    Manifest,
    read_manifest,
)
from fusion_engine.artifacts.safe_files import check_finite, check_folder, member_path, parse_safetensors, sha256_file
from fusion_engine.artifacts.signing import sign_manifest, verify_manifest
from fusion_engine.artifacts.tensors import load_state, state_tensors
from fusion_engine.core.probes import Baselines
from fusion_engine.errors import ArtifactError, FusionEngineError
from fusion_engine.version import __version__

WEIGHT_OPTIONS = ("weights", "pretrained")  # options that fetch weights: never needed to rebuild a saved model


def rebuild_config(model) -> dict:
    """The model's config with options that fetch weights removed (tensors come from the artifact)."""
    config = model.config.model_dump()
    for spec, branch in zip(config["backbones"], model.branches):
        options = {k: v for k, v in spec["options"].items() if k not in WEIGHT_OPTIONS}
        options.update(getattr(branch.backbone, "rebuild_options", None) or {})
        spec["options"] = options
        spec["label"] = spec.get("label") or branch.name  # the name came from options dropped above
    return config


def _components(model) -> list[ComponentRecord]:
    """Who offered each component the model uses, as the engine that built it recorded."""
    offered = {(c["kind"], c["name"]): c for c in model.components}
    used = {("fusion", model.config.fusion.name)}
    for spec in model.config.backbones:
        used |= {("backbone", spec.name), ("extractor", spec.extractor.name)}
    records = []
    for kind, name in sorted(used):
        c = offered.get((kind, name), {})
        records.append(ComponentRecord(kind=kind, name=name, plugin=c.get("plugin", "?"), version=c.get("version")))
    return records


def _versions() -> dict[str, str]:
    return {
        "fusion_engine": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def save(model, folder, *, metrics: dict | None = None, encryption_key: bytes | None = None, signing_key=None) -> Path:
    """Write the model to ``folder`` atomically: the old content stays intact until the new is complete."""
    if model.class_names is None:
        raise ArtifactError("the model has no class names yet; fit it (or build it with class_names) before saving")
    folder = Path(folder)
    steps = model.compression
    tensors = pack_tensors(model) if steps else state_tensors(model)
    data = encrypt_tensors(tensors, encryption_key, MODEL_FILE) if encryption_key else safetensors_bytes(tensors)
    baselines = model.baselines
    with atomic_directory(folder) as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        manifest = Manifest(
            config=rebuild_config(model),
            class_names=model.class_names,
            branches=[
                BranchRecord(
                    name=b.name,
                    feature_dim=b.feature_dim,
                    data_config={k: list(v) if isinstance(v, tuple) else v for k, v in b.backbone.data_config.items()},
                )
                for b in model.branches
            ],
            components=_components(model),
            handcrafted_kinds=list(baselines.kinds) if baselines is not None else None,
            shared_backbones=model.shared_backbone_groups(),
            encrypted=bool(encryption_key),
            compression=steps,
            files={MODEL_FILE: sha256_file(tmp / MODEL_FILE)},
            metrics=metrics or model.metrics,
            history=model.history,
            versions=_versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(), indent=2, default=str))
        if signing_key:
            sign_manifest(tmp, signing_key)
    return folder


def verify(folder, public_key=None) -> Manifest:
    """Check the signature (when ``public_key`` is given) and every file's digest."""
    if not Path(folder).is_dir():
        raise ArtifactError(f"{folder} is not a saved model folder (it does not exist or is not a folder)")
    member_path(folder, SIGNATURE_FILE)  # a symlinked signature is refused like any other link
    if public_key is not None:
        verify_manifest(folder, public_key)
    manifest, _ = read_manifest(folder)
    if MODEL_FILE not in manifest.files:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {MODEL_FILE}; the artifact is incomplete or was edited")
    check_folder(folder, manifest.files, allowed_extra=UNLISTED_FILES)
    return manifest


def _check_plugins(manifest: Manifest, engine) -> None:
    for c in manifest.components:
        if c.name not in engine.registry.names(c.kind):
            raise ArtifactError(
                f"this model needs {c.kind} '{c.name}' from plugin '{c.plugin}'"
                + (f" (version {c.version})" if c.version else "")
                + ", which is not installed; install that plugin package (see `fusion-engine list`)"
            )


def load(folder, *, engine, public_key=None, encryption_key: bytes | None = None):
    """Rebuild a saved model with ``engine`` after checking integrity (and signature, with ``public_key``).

    Users call ``fusion_engine.load(folder)`` or ``Engine.load(folder)``, which pass the engine.
    """
    folder = Path(folder)
    manifest = verify(folder, public_key)
    _check_plugins(manifest, engine)
    # Read the bytes once and parse exactly what was hashed: the file cannot be swapped after verification.
    data = member_path(folder, MODEL_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.files[MODEL_FILE]:
        raise ArtifactError(f"{MODEL_FILE!r} was modified: sha256 differs from the one recorded in the manifest")
    if manifest.encrypted:
        key = encryption_key or load_key()
        tensors = decrypt_tensors(data, key, MODEL_FILE)
    else:
        tensors = parse_safetensors(data, folder / MODEL_FILE)
    del data
    check_finite(tensors, MODEL_FILE)
    model = _rebuild(manifest, engine)
    steps = [step.model_dump() for step in manifest.compression]
    if steps:
        restore(model, tensors, steps)
        model.compression = steps
    else:
        load_state(model, tensors)
    model.metrics, model.history, model.manifest = manifest.metrics, manifest.history, manifest
    return model.eval()


def _rebuild(manifest: Manifest, engine):
    """The untrained model of the manifest's config; a config that cannot be built is an ArtifactError."""
    try:
        model = engine.build(manifest.config, class_names=manifest.class_names)
        model.share_backbones(manifest.shared_backbones)
        if manifest.handcrafted_kinds is not None:
            model.baselines = Baselines(
                [b.feature_dim for b in model.branches], model.num_classes, manifest.handcrafted_kinds
            )
    except FusionEngineError as e:
        raise ArtifactError(f"cannot rebuild the model described by {MANIFEST_FILE}: {e}") from None
    except Exception as e:  # the manifest is untrusted input: whatever a plugin raises on it is reported, not a crash
        raise ArtifactError(f"cannot rebuild the model described by {MANIFEST_FILE}: {type(e).__name__}: {e}") from None
    recorded = [(b.name, b.feature_dim) for b in manifest.branches]
    built = [(b.name, b.feature_dim) for b in model.branches]
    if recorded != built:
        raise ArtifactError(
            f"{MANIFEST_FILE} is inconsistent: its branches {recorded} differ from those its config builds {built}"
        )
    return model
