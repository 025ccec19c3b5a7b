"""Exported ONNX graphs kept on disk (and in memory) under a key, with the record of their parity check.

Each entry is ``KEY.onnx`` (the graph) and ``KEY.json`` (what made it and how it compared with torch),
both written atomically in ``directory``; the JSON holds the graph's sha256, checked on every read,
so a damaged or replaced graph is made again. Without a directory, graphs live in memory for the
process only. A second run with the same key neither exports nor checks again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fusion_engine.artifacts.atomic import atomic_write_bytes, atomic_write_text
from fusion_engine.artifacts.safe_files import read_small_file

RECORD_FORMAT = "fusion-engine-onnx-graph/1"
MAX_RECORD_BYTES = 64 << 10
_MEMORY: dict[str, tuple[bytes, dict]] = {}  # key -> (graph, record), this process only
_MEMORY_ENTRIES = 16


def _read(directory: Path, key: str) -> tuple[bytes, dict] | None:
    graph_path, record_path = directory / f"{key}.onnx", directory / f"{key}.json"
    try:
        record = json.loads(read_small_file(record_path, MAX_RECORD_BYTES))
        graph = graph_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if record.get("sha256") != hashlib.sha256(graph).hexdigest():
        return None
    return graph, record


def graph(key: str, directory, make) -> tuple[bytes, dict]:
    """``(graph bytes, record)`` for ``key``: from memory, else from ``directory``, else ``make()``
    (returning ``(graph, record)``), stored in both. The record gains ``sha256`` and ``format``."""
    if key in _MEMORY:
        found = _MEMORY[key]
        if directory and not (Path(directory) / f"{key}.json").is_file():  # made without a cache folder
            save(key, directory, *found)
    else:
        found = _read(Path(directory), key) if directory else None
        if found is None:
            data, record = make()
            found = data, {**record, "format": RECORD_FORMAT, "sha256": hashlib.sha256(data).hexdigest()}
            if directory:
                save(key, directory, *found)
    _remember(key, found)
    return found


def save(key: str, directory, data: bytes, record: dict) -> None:
    """Write ``KEY.onnx`` then ``KEY.json`` atomically (and update the in-memory copy)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / f"{key}.onnx", data)
    atomic_write_text(directory / f"{key}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    _remember(key, (data, record))


def _remember(key: str, entry: tuple[bytes, dict]) -> None:
    _MEMORY.pop(key, None)
    _MEMORY[key] = entry
    while len(_MEMORY) > _MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))


def forget() -> None:
    """Drop the in-memory copies (tests: make the next lookup read the disk)."""
    _MEMORY.clear()
