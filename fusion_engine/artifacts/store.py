"""Saved models (RUN_DIR): ``model.safetensors`` + ``manifest.json`` (+ ``manifest.sig``), never pickle.

The manifest is schema-versioned and validated by pydantic on load. It records the
rebuildable config, class names, preprocessing, plugins and versions, metrics and
history, and the sha256 of every file; loading re-hashes every file, refuses any
change, missing, unlisted or escaping file, checks the signature when a public key is
given, and decrypts tensors in memory when they were saved encrypted. The file names and the
manifest's schema are in ``manifest.py``.

Each file is read once and what was checked is what is used: the manifest's bytes are verified
against the signature and then parsed, never read again; the weights are hashed in memory and
parsed from those same bytes. Loading rebuilds from the manifest's config only with options that
fetch nothing (see :func:`check_rebuild_options`), and with a public key it also refuses a
component now served by another distribution than the one the manifest records.
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

from fusion_engine.artifacts.atomic import atomic_directory, recover
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
    parse_manifest,
    read_manifest_bytes,
)
from fusion_engine.artifacts.safe_files import check_finite, check_folder, member_path, parse_safetensors, sha256_file
from fusion_engine.artifacts.signing import sign_manifest, verify_manifest
from fusion_engine.artifacts.tensors import load_state, state_tensors
from fusion_engine.core.config import parse_config
from fusion_engine.core.probes import Baselines
from fusion_engine.errors import ArtifactError, FusionEngineError
from fusion_engine.version import __version__

WEIGHT_OPTIONS = ("weights", "pretrained")  # options that fetch weights: never needed to rebuild a saved model
# Backbone options (top level, or inside ``model_kwargs``, which timm passes on to ``create_model``) that
# read weights from a file, the hub or a URL; ``pretrained_cfg``/``pretrained_cfg_overlay`` only when they
# name where the weights come from (one of PRETRAINED_SOURCES).
FETCH_OPTIONS = (*WEIGHT_OPTIONS, "checkpoint_path")
PRETRAINED_CFG_OPTIONS = ("pretrained_cfg", "pretrained_cfg_overlay")
PRETRAINED_SOURCES = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict")
MODEL_SOURCES = ("hf-hub", "hf_hub", "local-dir")  # timm model-name prefixes (``hf-hub:org/name``) that read
# a config, and with it code paths and weights, from the hub or a folder


def _option_fetches(key: str, value) -> bool:
    """Whether backbone option ``key`` = ``value`` (top level or in ``model_kwargs``) fetches weights or code."""
    if value is None or value is False:
        return False
    if key in FETCH_OPTIONS:
        return True
    if key in PRETRAINED_CFG_OPTIONS:
        return isinstance(value, dict) and any(value.get(k) not in (None, "", False) for k in PRETRAINED_SOURCES)
    if key == "model" and isinstance(value, str):
        source, colon, _ = value.partition(":")
        return "://" in value or bool(colon) and source.strip().lower() in MODEL_SOURCES
    return False


def _fetching_options(options: dict, marked, *, backbone: bool) -> list[str]:
    """Names (``model_kwargs.x`` for nested ones) of the options in ``options`` that fetch weights or code:
    those ``marked`` by the component's factory (``fetch_options``) and, for a backbone, the built-in rules."""
    found = [k for k, v in options.items() if k in marked and v is not None and v is not False]
    if backbone:
        found += [k for k, v in options.items() if k not in found and _option_fetches(k, v)]
        nested = options.get("model_kwargs")
        if isinstance(nested, dict):
            found += [f"model_kwargs.{k}" for k, v in nested.items() if _option_fetches(k, v)]
    return found


def _marked_fetch_options(owner) -> tuple[str, ...]:
    """The option names ``owner`` (a factory, or the module a class factory built) declares as fetching."""
    marked = getattr(owner, "fetch_options", None) or ()
    if isinstance(marked, str):
        marked = (marked,)
    try:
        return tuple(str(name) for name in marked)
    except TypeError:  # not iterable: a plugin's mistake, and nothing to drop
        return ()


def rebuild_config(model) -> dict:
    """The model's config with options that fetch weights removed (tensors come from the artifact): those
    of FETCH_OPTIONS (also inside ``model_kwargs``) and those a class factory marks in ``fetch_options``."""
    config = model.config.model_dump()
    for spec, branch in zip(config["backbones"], model.branches):
        marked = _marked_fetch_options(branch.backbone)
        options = {k: v for k, v in spec["options"].items() if k not in WEIGHT_OPTIONS and k not in marked}
        options.update(getattr(branch.backbone, "rebuild_options", None) or {})
        if isinstance(options.get("model_kwargs"), dict):
            options["model_kwargs"] = {k: v for k, v in options["model_kwargs"].items() if not _option_fetches(k, v)}
        spec["options"] = options
        spec["label"] = spec.get("label") or branch.name  # the name came from options dropped above
    return config


def check_rebuild_options(config: dict, engine) -> None:
    """Refuse a manifest's config whose options would make loading fetch weights or code; ArtifactError
    naming the option and the branch, raised before anything is built or read.

    A saved model never needs them: its tensors are in ``model.safetensors``, and ``save`` drops them. The
    refused backbone options, at the top level or inside ``model_kwargs``: ``weights``, ``pretrained``,
    ``checkpoint_path``; ``pretrained_cfg`` / ``pretrained_cfg_overlay`` naming a ``file``, ``url`` or hub
    id; a ``model`` starting with ``hf-hub:``, ``hf_hub:`` or ``local-dir:`` or holding ``://``.

    A plugin marks further options of its own as fetching with a ``fetch_options`` attribute on the
    component's factory, a tuple of option names::

        def my_backbone(arch: str, checkpoint: str | None = None): ...
        my_backbone.fetch_options = ("checkpoint",)

    Any of them given (not None/False) in a manifest is refused the same way, for backbones, extractors
    and fusions. ``save`` leaves a backbone's marked options out of the manifest when the module the
    factory built carries the same attribute: a class factory's instances see its class attribute; a
    function factory sets it on the module it returns.
    """
    try:
        parsed = parse_config(config)
    except FusionEngineError as e:
        raise ArtifactError(f"cannot rebuild the model described by {MANIFEST_FILE}: {e}") from None
    parts = []  # (kind, name, options, where)
    for i, (spec, branch) in enumerate(zip(parsed.backbones, parsed.branch_names())):
        parts.append(("backbone", spec.name, spec.options, f"branch '{branch}' (backbones[{i}])"))
        extractor = spec.extractor
        parts.append(("extractor", extractor.name, extractor.options, f"branch '{branch}' (backbones[{i}].extractor)"))
    parts.append(("fusion", parsed.fusion.name, parsed.fusion.options, "the fusion"))
    for kind, name, options, where in parts:
        try:
            factory = engine.registry.get(kind, name).factory
        except FusionEngineError:  # not installed: the plugin check names it
            factory = None
        found = _fetching_options(options, _marked_fetch_options(factory), backbone=kind == "backbone")
        if found:
            value = options
            for key in found[0].split("."):
                value = value[key]
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ArtifactError(
                f"{MANIFEST_FILE} gives {where}, {kind} '{name}', the option '{found[0]}' = {shown}, which fetches "
                f"weights or code (a file, the hub or a URL); a saved model never needs it (its tensors are in "
                f"{MODEL_FILE}), so the manifest was edited: refusing to load it"
            )


def _components(model) -> list[ComponentRecord]:
    """Who offered each component the model uses, as the engine that built it recorded."""
    offered = {(c["kind"], c["name"]): c for c in model.components}
    used = {("fusion", model.config.fusion.name)}
    for spec in model.config.backbones:
        used |= {("backbone", spec.name), ("extractor", spec.extractor.name)}
    records = []
    for kind, name in sorted(used):
        c = offered.get((kind, name), {})
        records.append(
            ComponentRecord(
                kind=kind,
                name=name,
                plugin=c.get("plugin", "?"),
                version=c.get("version"),
                distribution=c.get("distribution"),
            )
        )
    return records


def installed_versions() -> dict[str, str]:
    """fusion-engine, torch, timm and Python as installed here (recorded in every manifest)."""
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
            versions=installed_versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        raw = json.dumps(manifest.model_dump(), indent=2, default=str).encode("utf-8")
        (tmp / MANIFEST_FILE).write_bytes(raw)
        if signing_key:
            sign_manifest(tmp, signing_key, raw)  # signs the bytes written, not a re-read of the file
    return folder


def _read_trusted_manifest(folder, public_key) -> tuple[Manifest, bytes]:
    """``folder``'s manifest, read once: the signature (with ``public_key``) is checked over those bytes and
    those same bytes are parsed, so swapping the file during a load cannot get an edited manifest used."""
    recover(folder)  # a save killed mid-swap left the previous model aside: put it back first
    if not Path(folder).is_dir():
        raise ArtifactError(f"{folder} is not a saved model folder (it does not exist or is not a folder)")
    member_path(folder, SIGNATURE_FILE)  # a symlinked signature is refused like any other link
    raw = read_manifest_bytes(folder)
    if public_key is not None:
        verify_manifest(folder, public_key, raw)
    return parse_manifest(raw, Path(folder) / MANIFEST_FILE), raw


def _check_files(folder, manifest: Manifest) -> None:
    if MODEL_FILE not in manifest.files:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {MODEL_FILE}; the artifact is incomplete or was edited")
    check_folder(folder, manifest.files, allowed_extra=UNLISTED_FILES)


def verify(folder, public_key=None) -> Manifest:
    """Check the signature (when ``public_key`` is given) and every file's digest; return the manifest
    parsed from the very bytes that were verified."""
    manifest, _ = _read_trusted_manifest(folder, public_key)
    _check_files(folder, manifest)
    return manifest


def sign(folder, private_key) -> str:
    """Sign ``folder``'s manifest after checking every file's digest against it; return the key's fingerprint.

    The manifest is read once: the bytes whose digests were checked are the bytes signed.
    """
    manifest, raw = _read_trusted_manifest(folder, None)
    _check_files(folder, manifest)  # never sign an artifact whose files no longer match its manifest
    return sign_manifest(folder, private_key, raw)


def _describe(distribution: str | None) -> str:
    return f"distribution '{distribution}'" if distribution else "no installed distribution (a plugin given in code)"


def _check_plugins(manifest: Manifest, engine, *, signed: bool = False) -> None:
    """Every recorded component is registered; for a signed model, by the same distribution as at save."""
    for c in manifest.components:
        if c.name not in engine.registry.names(c.kind):
            raise ArtifactError(
                f"this model needs {c.kind} '{c.name}' from plugin '{c.plugin}'"
                + (f" (version {c.version})" if c.version else "")
                + ", which is not installed; install that plugin package (see `fusion-engine list`)"
            )
        if not signed or "distribution" not in c.model_fields_set:  # a manifest from before the field: unknown
            continue
        current = engine.registry.get(c.kind, c.name)
        now = getattr(current, "distribution", None)
        if now != c.distribution:
            raise ArtifactError(
                f"this signed model was saved with {c.kind} '{c.name}' from {_describe(c.distribution)} (plugin "
                f"'{c.plugin}'" + (f" {c.version}" if c.version else "") + f"), but here {c.kind} '{c.name}' is "
                f"served by {_describe(now)} (plugin '{current.plugin}'"
                + (f" {current.version}" if current.version else "")
                + "); refusing to run another package's code under this signature: uninstall that package or "
                "install the recorded one (see `fusion-engine list`)"
            )


def load(folder, *, engine, public_key=None, encryption_key: bytes | None = None):
    """Rebuild a saved model with ``engine`` after checking integrity (and signature, with ``public_key``).

    Users call ``fusion_engine.load(folder)`` or ``Engine.load(folder)``, which pass the engine.
    """
    folder = Path(folder)
    manifest, _ = _read_trusted_manifest(folder, public_key)
    check_rebuild_options(manifest.config, engine)  # before any file is read or anything built
    _check_files(folder, manifest)
    _check_plugins(manifest, engine, signed=public_key is not None)
    if encryption_key is not None and not manifest.encrypted:
        raise ArtifactError(
            f"{folder} is not encrypted, but an encryption key was given; drop the key "
            "(--key-file / encryption_key) to load a plaintext model"
        )
    # Read the bytes once and parse exactly what was hashed: the file cannot be swapped after verification.
    try:
        data = member_path(folder, MODEL_FILE).read_bytes()
    except OSError as e:  # replaced since the digest check: refuse, do not guess
        raise ArtifactError(f"cannot read {folder / MODEL_FILE}: {e}") from None
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
    model.fitted = True
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
