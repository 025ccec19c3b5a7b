"""Pretrained-weights folders: an ``index.json`` maps a weights name to its file and metadata.

Folders are searched in this order, the first entry of a name winning:

1. ``--weights-dir`` / ``FUSION_ENGINE_WEIGHTS_DIR`` (several joined with ``os.pathsep``);
2. folders shipped by installed distributions through the ``fusion_engine.weights`` entry-point group
   (``NAME = "some_package"``: the folder of that module or package holds an ``index.json``). The folder is
   found from the distribution's file list or ``importlib.util.find_spec``; the module is never imported.
   A distribution named in ``FUSION_ENGINE_DISABLE_PLUGINS`` (or whose entry point is) ships none.

An entry looks like ``../shared/weights/index.json``: ``architecture`` (``"timm:mobilenetv2_100"``),
``timm_kwargs``, ``input_size``, ``mean``, ``std``, ``interpolation``, ``file`` (relative to the index),
``sha256``, ``source``, ``license``. Reading adds ``path`` (the file, absolute), ``distribution`` (the
distribution that shipped it, None for a folder given by the user) and ``recorded_in`` (where its
sha256 comes from, and how to fix a mismatch, in words). A shipped entry without a sha256 is left out:
shipped weights are always verified when loaded (``artifacts.safe_files.load_weights_file(sha256=...)``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

from fusion_engine.errors import WeightsError

ENV_VAR = "FUSION_ENGINE_WEIGHTS_DIR"
ENTRY_POINT_GROUP = "fusion_engine.weights"
DISABLE_VAR = "FUSION_ENGINE_DISABLE_PLUGINS"  # the plugins' deny-list applies to shipped weights too
_SHA256 = re.compile(r"[0-9a-f]{64}")


def weights_dirs() -> list[Path]:
    """The folders given by the user (``--weights-dir`` / ``FUSION_ENGINE_WEIGHTS_DIR``), in order."""
    value = os.environ.get(ENV_VAR, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def _module_folder(module: str, dist) -> Path | None:
    """The folder of ``module`` (a dotted name), found without importing it or any package above it."""
    parts = module.split(".")
    if dist is not None:  # a regular install lists the module's files
        for file in dist.files or ():
            if file.parts in ((*parts, "__init__.py"), (*parts[:-1], parts[-1] + ".py")):
                folder = Path(dist.locate_file(file)).parent
                if (folder / "index.json").is_file():
                    return folder
    try:  # an editable install or a plain folder on sys.path: the top-level spec is found without importing
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        places = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin and len(parts) == 1:
        return Path(spec.origin).parent
    else:
        return None
    for i, part in enumerate(parts[1:], start=2):
        last = i == len(parts)
        found = [p / part for p in places if (p / part).is_dir()]
        if not found and last:
            found = [p for p in places if (p / f"{part}.py").is_file()]
        if not found:
            return None
        places = found
    return places[0]


def shipped_folders() -> list[tuple[Path, str]]:
    """(folder, distribution name) for every ``fusion_engine.weights`` entry point whose folder holds an
    ``index.json``, sorted by distribution and entry-point name."""
    denied = {item.strip() for item in os.environ.get(DISABLE_VAR, "").split(",") if item.strip()}
    out = []
    points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda ep: ((ep.dist.name if ep.dist else ""), ep.name),
    )
    for ep in points:
        dist = ep.dist.name if ep.dist else None
        if ep.name in denied or (dist and dist in denied):
            continue
        folder = _module_folder(ep.value.split(":")[0].strip(), ep.dist)
        if folder is not None and (folder / "index.json").is_file() and folder not in [f for f, _ in out]:
            out.append((folder, dist or ep.name))
    return out


def _recorded_in(index_file: Path, distribution: str | None) -> str:
    if distribution:
        return (
            f"the index.json of package '{distribution}' ({index_file}); reinstall the package "
            f"(pip install --force-reinstall --no-deps {distribution})"
        )
    return f"{index_file}; restore the file or correct its index entry"


def read_index(folder, distribution: str | None = None) -> dict[str, dict]:
    """The folder's index.json entries, each with ``path``, ``distribution`` and ``recorded_in`` added."""
    folder = Path(folder)
    index_file = folder / "index.json"
    if not index_file.is_file():
        return {}
    try:
        entries = json.loads(index_file.read_text())
    except ValueError as exc:
        raise WeightsError(f"{index_file} is not valid JSON: {exc}") from None
    out = {}
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        if distribution and not _SHA256.fullmatch(str(entry.get("sha256", ""))):
            continue  # shipped weights are verified when loaded: no digest, not offered
        out[name] = {
            **entry,
            "path": str((folder / entry["file"]).resolve()),
            "distribution": distribution,
            "recorded_in": _recorded_in(index_file, distribution),
        }
    return out


def all_entries() -> dict[str, dict]:
    """Every indexed weights entry: the user's folders first, then shipped ones (the first of a name wins)."""
    out: dict[str, dict] = {}
    for folder, distribution in [(f, None) for f in weights_dirs()] + shipped_folders():
        for name, entry in read_index(folder, distribution).items():
            out.setdefault(name, entry)
    return out


def shipped_entries() -> dict[str, dict]:
    """The entries shipped by installed distributions (whether or not a user's folder has the same name)."""
    out: dict[str, dict] = {}
    for folder, distribution in shipped_folders():
        for name, entry in read_index(folder, distribution).items():
            out.setdefault(name, entry)
    return out


def find_entry(name: str) -> dict | None:
    """The index entry for ``name``, or None when ``name`` is not an indexed weights name."""
    return all_entries().get(name)


def timm_model(name: str, entry: dict) -> str | None:
    """The timm model an entry's weights are for: ``architecture`` ``timm:NAME``, or a timm family at a width
    timm does not register, named by the weights (``mobilenetv1_050.*``, architecture ``timm MobileNetV1 ...``);
    None for weights of anything else."""
    architecture = str(entry.get("architecture", ""))
    if architecture.startswith("timm:"):
        return architecture.split(":", 1)[1]
    base = name.split(".", 1)[0]
    if architecture.startswith("timm ") and re.fullmatch(r"mobilenetv1_\d{3}", base):
        return base
    return None
