"""Local pretrained-weights folders: an ``index.json`` maps a weights name to its file and metadata.

Folders come from ``--weights-dir`` / ``FUSION_ENGINE_WEIGHTS_DIR`` (several joined with
``os.pathsep``). An entry looks like ``../shared/weights/index.json``: ``architecture``
(``"timm:mobilenetv2_100"``), ``timm_kwargs``, ``input_size``, ``mean``, ``std``,
``interpolation``, ``file``, ``sha256``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fusion_engine.errors import WeightsError

ENV_VAR = "FUSION_ENGINE_WEIGHTS_DIR"


def weights_dirs() -> list[Path]:
    value = os.environ.get(ENV_VAR, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def read_index(folder) -> dict[str, dict]:
    """The folder's index.json entries, each with ``path`` (absolute file path) added."""
    folder = Path(folder)
    index_file = folder / "index.json"
    if not index_file.is_file():
        return {}
    try:
        entries = json.loads(index_file.read_text())
    except ValueError as exc:
        raise WeightsError(f"{index_file} is not valid JSON: {exc}") from None
    out = {}
    for name, entry in entries.items():
        if isinstance(entry, dict) and "file" in entry:
            out[name] = {**entry, "path": str((folder / entry["file"]).resolve())}
    return out


def all_entries() -> dict[str, dict]:
    """Every indexed weights entry across the configured folders (first folder wins)."""
    out: dict[str, dict] = {}
    for folder in weights_dirs():
        for name, entry in read_index(folder).items():
            out.setdefault(name, entry)
    return out


def find_entry(name: str) -> dict | None:
    """The index entry for ``name``, or None when ``name`` is not an indexed weights name."""
    return all_entries().get(name)
