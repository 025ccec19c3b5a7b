"""Where a model comes from, for people to read: its backbones and their options, the digests of its
weights, the plugins that offered its components, its signature and the versions it was saved and run with."""

from __future__ import annotations

import json
from pathlib import Path

from fusion_engine.artifacts.manifest import SIGNATURE_FILE, read_manifest
from fusion_engine.artifacts.store import installed_versions
from fusion_engine.errors import ArtifactError
from fusion_engine.training.feature_cache import tensors_digest


def provenance(model, run_dir=None, *, verified: bool = False) -> dict:
    """What the model records about its origin, as plain values.

    ``run_dir``: the RUN_DIR the model was loaded from or saved to; its manifest (``model.manifest`` when the
    model was loaded, else the file) gives the files' sha256, the saved versions and the creation time, and
    ``manifest.sig`` the signature. ``verified``: the signature was checked against a public key by the load.

    Keys: ``backbones`` (per branch: name, backbone, options, extractor, feature width, input size, a sha256
    of the branch's tensors), ``fusion``, ``components`` (kind, name, plugin, version, distribution),
    ``files`` (name -> sha256), ``signature`` (``status`` in words, ``signed``, ``verified``, ``fingerprint``),
    ``encrypted``, ``compression`` (methods), ``created``, ``saved_with`` and ``run_with`` (versions).
    """
    manifest = model.manifest
    if manifest is None and run_dir is not None:
        try:
            manifest, _ = read_manifest(run_dir)
        except ArtifactError:
            manifest = None
    config = model.config.model_dump()
    backbones = []
    for spec, branch in zip(config["backbones"], model.branches):
        input_size = branch.backbone.data_config.get("input_size")
        backbones.append(
            {
                "name": branch.name,
                "backbone": spec["name"],
                "options": {k: v for k, v in spec["options"].items() if v is not None},
                "extractor": spec["extractor"]["name"],
                "extractor_options": spec["extractor"]["options"],
                "frozen": spec.get("freeze", True),
                "feature_dim": branch.feature_dim,
                "input_size": list(input_size) if input_size is not None else None,
                "weights_sha256": tensors_digest(branch),
            }
        )
    return {
        "backbones": backbones,
        "fusion": config["fusion"],
        "components": [c.model_dump() for c in manifest.components]  # as saved; else as built here
        if manifest is not None
        else [dict(c) for c in model.components],
        "files": dict(manifest.files) if manifest is not None else {},
        "signature": signature_status(run_dir, verified=verified),
        "encrypted": bool(manifest.encrypted) if manifest is not None else False,
        "compression": [step["method"] for step in model.compression],
        "created": manifest.created if manifest is not None else "",
        "saved_with": dict(manifest.versions) if manifest is not None else {},
        "run_with": installed_versions(),
    }


def signature_status(run_dir, *, verified: bool = False) -> dict:
    """``run_dir``'s signature in words: signed and verified with a public key, signed but not checked here,
    unsigned, or not saved; with the signing key's fingerprint when there is a signature."""
    if run_dir is None:
        return {"signed": False, "verified": False, "fingerprint": None, "status": "not saved (no RUN_DIR)"}
    path = Path(run_dir) / SIGNATURE_FILE
    if not path.is_file():
        return {"signed": False, "verified": False, "fingerprint": None, "status": "unsigned"}
    try:
        fingerprint = json.loads(path.read_bytes()).get("public_key_fingerprint")
        fingerprint = fingerprint if isinstance(fingerprint, str) else None
    except (OSError, ValueError, AttributeError, RecursionError):
        fingerprint = None
    if verified:
        status = "signed; signature verified with the given public key"
    else:
        status = "signed; signature not checked here (evaluate with --public-key to verify it)"
    return {"signed": True, "verified": verified, "fingerprint": fingerprint, "status": status}
