"""Frozen-branch feature extraction with a persistent on-disk cache, checked on every read.

Each branch's features for a dataset are one float32 ``.npy`` file named by a key over
the branch's config, its weights (a digest of the actual tensors), its preprocessing and
the data digest; features are written in chunks to a memory-mapped file, so memory stays
bounded whatever the dataset size, and renamed into place only when complete.

Every entry is two files in the cache folder:

- ``KEY.npy``: the (N, D) float32 array, C order, a plain ``.npy`` (never pickled);
- ``KEY.json``: its sidecar, written atomically (temporary file + rename) right after the
  ``.npy`` is renamed into place::

      {"format": "fusion-engine-feature-entry/1", "key": KEY, "shape": [N, D],
       "dtype": "float32", "sha256": HEX}

  ``sha256`` is over the array's data bytes (C order, the ``.npy`` header excluded; the header's
  shape and dtype are checked against the sidecar and against what the caller expects).

A read maps the ``.npy`` (``allow_pickle=False``) and checks, in one chunked pass over the mapped
bytes it then returns (hash what you load, load what you hashed): the sidecar exists, parses and
names this key; shape and dtype are the expected ones; the bytes match the digest; every value is
finite. An entry failing any check (truncated, wrong shape or dtype, a pickled object array,
overwritten, copied from another key, an entry of an older version without a sidecar) is
discarded with a one-line note -- ``FeatureCache(note=...)``, a :class:`FeatureCacheWarning` by
default -- and re-extracted, which overwrites it. Extraction refuses a non-finite feature: a
:class:`~fusion_engine.errors.DataError` naming the branch, and nothing is written.

The check costs one sequential read of the entry (``benchmarks/cache_check.py``; see the
"Feature cache check" section of docs/benchmarks.md), small next to extracting the features. It
guards against damage, accidents and mix-ups in a shared ``--cache-dir``, not against someone who
may write there on purpose: such a writer can store wrong features with a matching sidecar, so
share a cache folder only with people you would let train your models. A file changed in place
after it was checked (not by rename, as the cache itself writes) is not detected either.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import queue
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fusion_engine.runtime.onnx_cache as onnx_cache
import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.safe_files import read_small_file
from fusion_engine.artifacts.store import rebuild_config
from fusion_engine.core.data import collate_images
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ConfigError, DataError, ExportError, printable
from fusion_engine.runtime.export import OPSET, branch_graph, onnx_session, to_channels
from fusion_engine.runtime.int8 import CALIBRATION_IMAGES, calibration_batches, quantize_graph
from fusion_engine.runtime.runtimes import autocast, fast_memory_format

CACHE_VERSION = "features-v2"  # v2: keyed by the architecture, not by how the weights were named
ENTRY_FORMAT = "fusion-engine-feature-entry/1"
EXTRACT_RUNTIMES = ("auto", "torch", "bf16", "onnx", "int8")
UNEXPORTABLE: set[str] = set()  # graph keys of branches torch.onnx failed to export, in this process
ONNX_RUNTIMES = ("onnx", "int8")  # run by onnxruntime from a graph exported per branch
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")  # what exporting and running a graph needs
PARITY_IMAGES = 16  # real images each exported graph is compared with torch on, once
ONNX_TOLERANCE = 1e-3  # fp32 graph: max abs difference / feature scale (max |torch feature|); measured ~1e-6
INT8_MIN_COSINE = 0.99  # int8 graph: lowest cosine similarity of one image's features with torch's
PREFETCH_BATCHES = 2  # batches decoded ahead of the forward pass (0: decode in the loop)
SCAN_CHUNK_BYTES = 16 << 20  # one chunk of the checking pass: memory stays bounded
MAX_SIDECAR_BYTES = 64 << 10


class FeatureCacheWarning(UserWarning):
    """A cache entry was discarded (damaged or mismatched) and is extracted again."""


class ExtractionRuntimeWarning(UserWarning):
    """An exported graph disagreed with torch; that branch is extracted with another runtime."""


class DamagedEntry(Exception):
    """Internal: why a cache entry cannot be used (one line)."""


def default_cache_dir() -> Path:
    """``$FUSION_ENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusion-engine/features`` (~/.cache)."""
    env = os.environ.get("FUSION_ENGINE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fusion-engine" / "features"


def tensors_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state-dict names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def branch_identity(model, index: int) -> dict:
    """What branch ``index`` computes: its architecture (the options that rebuild it, without those
    that only name or fetch weights, so a model saved and loaded again is the same branch), the
    digest of its tensors, its preprocessing, its extractor, and the size images are batched at."""
    branch = model.branches[index]
    spec = model.config.backbones[index]
    return {
        "backbone": spec.name,
        "architecture": rebuild_config(model)["backbones"][index]["options"],
        "extractor": spec.extractor.model_dump(),
        "weights": tensors_digest(branch),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in branch.backbone.data_config.items()},
        # images are batched at the largest branch input size, so it shapes every branch's input too
        "loader_input_size": list(input_size_for(model)),
    }


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def branch_key(model, index: int, data_digest: str, runtime: str = "torch", graph: str | None = None) -> str:
    """Cache key of one branch's features on one dataset (and the extraction runtime, unless torch;
    ``graph``: the sha256 of the int8 graph, whose calibration shapes the features)."""
    parts = {"version": CACHE_VERSION, **branch_identity(model, index), "data": data_digest}
    if runtime != "torch":  # bf16 features differ from float32 ones; onnxruntime's agree to ~1e-5; int8's less
        parts["runtime"] = runtime
    if graph:
        parts["graph"] = graph
    return _digest(parts)


def onnx_available() -> bool:
    """Whether exporting and running ONNX graphs works here (onnx, onnxruntime, onnxscript importable)."""
    return all(importlib.util.find_spec(m) is not None for m in ONNX_MODULES)


def resolve_runtime(runtime: str, device) -> str:
    """``auto``: onnx on the CPU when onnxruntime is installed, torch otherwise and on GPUs; the others as given."""
    if runtime != "auto":
        return runtime
    return "onnx" if torch.device(device).type == "cpu" and onnx_available() else "torch"


def graph_key(model, index: int, kind: str) -> str:
    """Key of branch ``index``'s exported graph: what the branch computes, the graph kind (onnx or
    int8, with its calibration size) and the versions that shape the export."""
    import onnxruntime

    parts = {"graph": kind, **branch_identity(model, index), "opset": OPSET, "torch": torch.__version__}
    parts["onnxruntime"] = onnxruntime.__version__
    if kind == "int8":
        parts["calibration_images"] = CALIBRATION_IMAGES
    return _digest(parts)


def sample_images(model, dataset, count: int, seed: int) -> torch.Tensor:
    """``count`` images of ``dataset`` (a seeded sample, in order) as the loader batches them."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(dataset), size=min(count, len(dataset)), replace=False))
    images, _ = collate_images([dataset[int(i)] for i in picked], size=input_size_for(model))
    return to_channels(images, 3)


def compare(got: np.ndarray, expected: np.ndarray) -> dict:
    """Max abs difference, the features' scale (max |expected|) and the lowest per-image cosine similarity."""
    scale = float(np.abs(expected).max())
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = np.where(norms > 0, (got * expected).sum(1) / np.maximum(norms, 1e-30), 1.0)
    return {"max_abs_diff": float(np.abs(got - expected).max()), "scale": scale, "min_cosine": float(cosine.min())}


def passes(record: dict) -> bool:
    """Whether a graph's parity record is within the tolerance of its kind (ONNX_TOLERANCE, INT8_MIN_COSINE)."""
    if record["kind"] == "int8":
        return record["min_cosine"] >= INT8_MIN_COSINE
    return record["max_abs_diff"] <= ONNX_TOLERANCE * max(record["scale"], 1.0)


@dataclass
class Plan:
    """How one branch is extracted: its runtime and, for onnx and int8, the graph bytes and their sha256."""

    runtime: str
    graph: bytes | None = None
    sha256: str | None = None


def scan(array: np.ndarray, digest: bool = True) -> tuple[str | None, int | None]:
    """One chunked pass over a 2-D C-ordered array: sha256 of its data bytes (None unless
    ``digest``) and the first row holding a NaN or inf (None when every value is finite)."""
    h = hashlib.sha256() if digest else None
    bad = None
    row_bytes = max(1, array.shape[1] * array.itemsize) if array.ndim == 2 else max(1, array.nbytes)
    step = max(1, SCAN_CHUNK_BYTES // row_bytes)
    for start in range(0, len(array), step):
        chunk = np.ascontiguousarray(array[start : start + step])
        if h is not None:
            h.update(memoryview(chunk).cast("B"))
        if bad is None and not np.isfinite(chunk).all():
            rows = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
            bad = start + int(np.flatnonzero(rows)[0])
    return (h.hexdigest() if h is not None else None), bad


def non_finite_error(name: str, row: int) -> DataError:
    return DataError(
        f"{name} produced a non-finite feature (NaN or inf) for image {row}; nothing was cached. "
        "Check that backbone's weights and preprocessing (mean/std options), or extract with "
        "--extract-runtime torch"
    )


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, control characters escaped (a damaged file's bytes never reach the terminal raw)."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _replace_atomically(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def _warn(message: str) -> None:
    warnings.warn(message, FeatureCacheWarning, stacklevel=4)


class FeatureCache:
    """Feature arrays on disk, filled once and checked on every read; ``stats`` counts hits and
    extractions, ``discarded`` lists ``(path, reason)`` of the entries found damaged.

    ``note(message)`` receives one line per discarded entry (default: a :class:`FeatureCacheWarning`).

    ``runtime``: torch, bf16, onnx, int8, or auto (onnx on the CPU when onnxruntime is installed, else
    torch). onnx and int8 export each branch once (graphs kept in ``DIRECTORY/onnx``, or in memory
    without a cache) and compare it with torch on a few of the images at hand before first use; a graph
    that disagrees is not used: int8 falls back to onnx, onnx to torch, with one line to ``log`` (and a
    :class:`ExtractionRuntimeWarning`) giving the difference. ``plans`` records the runtime each branch
    used, ``checks`` the comparisons.
    """

    def __init__(self, directory=None, enabled: bool = True, runtime: str = "torch", note=None, log=None):
        if runtime not in EXTRACT_RUNTIMES:
            raise ConfigError(f"unknown extraction runtime '{runtime}'; valid: {', '.join(EXTRACT_RUNTIMES)}")
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.runtime = runtime
        self.note = note or _warn
        self.log = log
        self.sessions: dict = {}  # graph sha256 -> onnxruntime session, reused by later calls
        self.checks: dict[str, dict] = {}  # graph key -> its parity record
        self.plans: list[Plan] = []  # of the last features() call
        self._fell_back: set[tuple[str, str]] = set()
        self.stats = {"hits": 0, "extracted": 0, "extract_seconds": 0.0}  # + wait_seconds once images are read
        self.discarded: list[tuple[Path, str]] = []

    @property
    def graph_directory(self) -> Path | None:
        """Where exported graphs are kept: ``DIRECTORY/onnx``; None (memory only) when caching is off."""
        return self.directory / "onnx" if self.enabled else None

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def sidecar(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    # ------------------------------------------------------------------ reading, checked

    def read(self, key: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The entry for ``key`` (memory-mapped, read-only) when present and sound; None when
        absent, or when damaged or mismatched (then noted in one line and listed in ``discarded``)."""
        path = self.path(key)
        if not path.exists() and not self.sidecar(key).exists():
            return None
        try:
            return self._checked(key, tuple(shape))
        except DamagedEntry as exc:
            reason = one_line(exc)
            self.discarded.append((path, reason))
            self.note(f"feature cache: discarded {path}: {reason}; extracting it again")
            return None

    def _checked(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        path, meta_path = self.path(key), self.sidecar(key)
        if not path.is_file():
            raise DamagedEntry(f"the features file is missing (only {meta_path.name} is there)")
        if not meta_path.is_file():
            raise DamagedEntry(f"no sidecar {meta_path.name} (an entry of an older version, or an interrupted write)")
        try:
            meta = json.loads(read_small_file(meta_path, MAX_SIDECAR_BYTES))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise DamagedEntry(f"unreadable sidecar {meta_path.name}: {type(exc).__name__}: {exc}") from None
        if meta.get("format") != ENTRY_FORMAT:
            raise DamagedEntry(f"sidecar format {meta.get('format')!r}, expected {ENTRY_FORMAT!r}")
        if meta.get("key") != key:
            raise DamagedEntry(f"the sidecar was written for key {meta.get('key')!r}, not {key}")
        if meta.get("dtype") != "float32" or meta.get("shape") != list(shape):
            raise DamagedEntry(
                f"the sidecar records {meta.get('dtype')!r} {meta.get('shape')!r}, expected float32 {list(shape)}"
            )
        digest = meta.get("sha256")
        if not isinstance(digest, str):
            raise DamagedEntry("the sidecar records no sha256 digest")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # truncated, garbage header, object arrays (never unpickled): all just damage
            raise DamagedEntry(f"unreadable .npy: {type(exc).__name__}: {exc}") from None
        if not isinstance(array, np.ndarray):  # an .npz archive: np.load opened it lazily
            getattr(array, "close", lambda: None)()
            raise DamagedEntry(f"the file holds a {type(array).__name__}, not an array")
        if array.dtype != np.float32 or array.shape != shape:
            raise DamagedEntry(f"the file holds {array.dtype} {list(array.shape)}, expected float32 {list(shape)}")
        if not array.flags.c_contiguous:
            raise DamagedEntry("the array is not stored in C order")
        actual, bad = scan(array)
        if actual != digest:
            raise DamagedEntry("its bytes do not match the sha256 recorded in the sidecar (overwritten or corrupted)")
        if bad is not None:
            raise DamagedEntry(f"non-finite values (NaN or inf) in row {bad}")
        return array

    def _write_sidecar(self, key: str, shape: tuple[int, int], digest: str) -> None:
        meta = {"format": ENTRY_FORMAT, "key": key, "shape": list(shape), "dtype": "float32", "sha256": digest}
        _replace_atomically(self.sidecar(key), (json.dumps(meta, indent=1) + "\n").encode())

    # ------------------------------------------------------------------ filling

    def arrays(self, keys: list[str], shapes: list[tuple[int, int]], fill, names: list[str] | None = None):
        """The cached arrays for ``keys``; missing ones are created and written by ``fill(indices, arrays)``.

        Arrays are filled in a temporary memory-mapped file and renamed into place when
        complete, so an interrupted run leaves no partial cache entry; a damaged entry is
        discarded and filled again. ``names[i]`` names array i in the error raised when ``fill``
        produces a non-finite value (then nothing is written).
        """
        names = names or [f"features {i}" for i in range(len(keys))]
        out: list[np.ndarray | None] = [None] * len(keys)
        if self.enabled:
            for i, key in enumerate(keys):
                out[i] = self.read(key, shapes[i])
                if out[i] is not None:
                    self.stats["hits"] += 1
        missing = [i for i, a in enumerate(out) if a is None]
        if not missing:
            return out
        start = time.perf_counter()
        tmp_paths = []
        try:  # from the first temporary file on: whatever fails, no .tmp file stays behind
            if self.enabled:
                self.directory.mkdir(parents=True, exist_ok=True)
                for i in missing:
                    fd, name = tempfile.mkstemp(prefix=f".{keys[i]}.", suffix=".npy.tmp", dir=self.directory)
                    os.close(fd)
                    tmp_paths.append(Path(name))
                buffers = [
                    np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=shapes[i])
                    for p, i in zip(tmp_paths, missing)
                ]
            else:
                buffers = [np.empty(shapes[i], dtype=np.float32) for i in missing]
            fill(missing, buffers)
            digests = []
            for j, i in enumerate(missing):  # every array is checked before any is written
                digest, bad = scan(buffers[j], digest=self.enabled)
                if bad is not None:
                    raise non_finite_error(names[i], bad)
                digests.append(digest)
            for j, i in enumerate(missing):
                if self.enabled:
                    buffers[j].flush()
                    out[i] = np.load(tmp_paths[j], mmap_mode="r", allow_pickle=False)  # the bytes just hashed
                    os.replace(tmp_paths[j], self.path(keys[i]))
                    self._write_sidecar(keys[i], shapes[i], digests[j])
                else:
                    out[i] = buffers[j]
        finally:
            for tmp in tmp_paths:
                tmp.unlink(missing_ok=True)
        self.stats["extract_seconds"] += time.perf_counter() - start
        self.stats["extracted"] += len(missing)
        return out

    def features(
        self, model, dataset, *, batch_size: int = 64, num_workers: int = 0, device="cpu", progress: bool = True
    ) -> list[np.ndarray]:
        """One (N, D_i) array per branch (memory-mapped when cached); one pass extracts all missing."""
        model.eval()
        runtime = resolve_runtime(self.runtime, device)
        self.plans = [self._plan(model, i, runtime, dataset, device) for i in range(len(model.branches))]
        if self.enabled:
            digest = dataset.digest()
            keys = [branch_key(model, i, digest, p.runtime, p.sha256) for i, p in enumerate(self.plans)]
        else:  # nothing is looked up or stored: skip hashing the images and the weights
            keys = [""] * len(model.branches)
        shapes = [(len(dataset), b.feature_dim) for b in model.branches]
        names = [f"branch {i} ({b.name})" for i, b in enumerate(model.branches)]

        def fill(indices, buffers):
            loader = make_loader(dataset, model, batch_size, num_workers)
            with Progress(len(dataset), extracting_label(model, indices), progress) as bar:
                run_branches(model, loader, indices, buffers, device, bar, *self._how(indices))

        if not distributed.active():
            return self.arrays(keys, shapes, fill, names)
        sharded = self._extract_sharded(model, dataset, keys, shapes, names, batch_size, num_workers, device, progress)
        arrays = self.arrays(keys, shapes, fill, names)  # all present now
        self.stats["hits"] -= sharded
        self.stats["extracted"] += sharded
        return arrays

    def _plan(self, model, index: int, runtime: str, dataset, device) -> Plan:
        """Branch ``index``'s runtime: ``runtime``, or the one it falls back to when its graph fails the check."""
        if runtime not in ONNX_RUNTIMES:
            return Plan(runtime)
        if torch.device(device).type != "cpu":
            raise ConfigError(
                f"extraction runtime '{runtime}' runs on the CPU, not on {device}; use 'torch' or 'bf16' "
                "there (--extract-runtime)"
            )
        name = model.branches[index].name
        key = graph_key(model, index, "onnx")
        if key in UNEXPORTABLE:
            return Plan("torch")
        try:
            fp32, record = self._graph(key, model, index, "onnx", dataset)
        except ExportError as e:  # a branch torch.onnx cannot trace (numpy inside, as handcrafted features)
            UNEXPORTABLE.add(key)  # not tried again in this process
            if self.log:
                why = ":".join(str(e).split(":")[:2])
                self.log(f"extraction: {printable(name)} has no ONNX graph ({why}); it runs in torch")
            return Plan("torch")
        if not record["passed"]:
            self._fall_back(name, "onnx", "torch", record)
            return Plan("torch")
        if runtime == "onnx":
            return Plan("onnx", fp32, record["sha256"])
        int8, record = self._graph(graph_key(model, index, "int8"), model, index, "int8", dataset, fp32)
        if not record["passed"]:
            self._fall_back(name, "int8", "onnx", record)
            return Plan("onnx", fp32, record.get("fp32_sha256"))
        return Plan("int8", int8, record["sha256"])

    def _graph(self, key: str, model, index: int, kind: str, dataset, fp32: bytes | None = None) -> tuple[bytes, dict]:
        """Branch ``index``'s graph of ``kind`` (onnx, or int8 made from ``fp32``), stored under ``key``, and its
        parity record: from the graph store, else exported (int8: quantised, calibrated on the data at hand), checked."""

        def make():
            start = time.perf_counter()
            if kind == "onnx":
                data = branch_graph(model, index, input_size_for(model))
            else:
                calibration = sample_images(model, dataset, CALIBRATION_IMAGES, seed=0)
                data = quantize_graph(fp32, calibration_batches(calibration.numpy()))
            seconds = time.perf_counter() - start
            images = sample_images(model, dataset, PARITY_IMAGES, seed=1)
            with torch.inference_mode():
                expected = model.branch_features(images, [index])[0].float().numpy()
            got = onnx_session(data).run(None, {"images": images.numpy()})[0]
            record = {"kind": kind, "branch": model.branches[index].name, **compare(got, expected)}
            record.update(images=len(images), checked_on=dataset.name, make_seconds=round(seconds, 1))
            if kind == "int8":
                record["fp32_sha256"] = hashlib.sha256(fp32).hexdigest()
            if self.log:
                verdict = "used" if passes(record) else "not used"
                self.log(
                    f"{kind} graph of {printable(record['branch'])} vs torch on {len(images)} images: max abs diff "
                    f"{record['max_abs_diff']:.2g} (features up to {record['scale']:.3g}), lowest cosine "
                    f"{record['min_cosine']:.4f}: {verdict}"
                )
            return data, record

        data, record = onnx_cache.graph(key, self.graph_directory, make)
        record = {**record, "passed": passes(record)}  # judged by today's tolerances, not those it was made with
        self.checks[key] = record
        return data, record

    def _fall_back(self, name: str, runtime: str, instead: str, record: dict) -> None:
        if (name, runtime) in self._fell_back:  # said once per cache, not once per dataset
            return
        self._fell_back.add((name, runtime))
        line = (
            f"extraction: the {runtime} graph of {printable(name)} disagrees with torch (max abs diff "
            f"{record['max_abs_diff']:.3g} on features up to {record['scale']:.3g}, lowest cosine "
            f"{record['min_cosine']:.4f}); extracting it with {instead} instead"
        )
        warnings.warn(line, ExtractionRuntimeWarning, stacklevel=3)
        if self.log:
            self.log(line)

    def _how(self, indices) -> tuple[dict, dict, str]:
        """``run_branches``' last arguments for ``indices``: the onnxruntime runners, the stats, the torch precision."""
        precision = "bf16" if any(self.plans[i].runtime == "bf16" for i in indices) else "fp32"
        return self._runners(indices), self.stats, precision

    def _runners(self, indices) -> dict:
        """``{branch index: run(images) -> features}`` for the branches of ``indices`` that onnxruntime runs."""
        runners = {}
        for i in indices:
            plan = self.plans[i]
            if plan.runtime not in ONNX_RUNTIMES:
                continue
            if plan.sha256 not in self.sessions:
                self.sessions[plan.sha256] = onnx_session(plan.graph)
            runners[i] = _session_runner(self.sessions[plan.sha256])
        return runners

    def _extract_sharded(self, model, dataset, keys, shapes, names, batch_size, num_workers, device, progress) -> int:
        """Collective: each rank extracts its slice of the images (each image exactly once) into a
        shard file; rank 0 joins the shards into the same cache entries a single process writes."""
        if not self.enabled:
            raise DataError("distributed extraction writes its shards through the feature cache; drop --no-cache")
        # every rank checks every entry, and they agree: one rank's damaged entry is missing for all
        votes = distributed.all_sum(
            [0.0 if self.read(key, shapes[i]) is not None else 1.0 for i, key in enumerate(keys)]
        )
        missing = [i for i, vote in enumerate(votes) if vote > 0]
        if not missing:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        me, world = distributed.rank(), distributed.world_size()
        part = distributed.shard(len(dataset))

        def shard_file(i: int, r: int) -> Path:
            return self.directory / f".{keys[i]}.shard{r}of{world}.npy"

        buffers = [
            np.lib.format.open_memmap(shard_file(i, me), mode="w+", dtype=np.float32, shape=(len(part), shapes[i][1]))
            for i in missing
        ]
        start = time.perf_counter()
        loader = make_loader(dataset.subset(list(part)), model, batch_size, num_workers)
        label = f"{extracting_label(model, missing)} (rank {me}/{world})"
        with Progress(len(part), label, progress and me == 0) as bar:
            run_branches(model, loader, missing, buffers, device, bar, *self._how(missing))
        bad = [scan(buffer, digest=False)[1] for buffer in buffers]
        for buffer in buffers:
            buffer.flush()
        del buffers
        # every rank learns whether any shard holds a non-finite value, so all of them stop together
        flags = distributed.all_sum([0.0 if row is None else 1.0 for row in bad])
        if any(flags):
            for i in missing:
                shard_file(i, me).unlink(missing_ok=True)
            j = next(j for j, flag in enumerate(flags) if flag)
            if bad[j] is not None:
                raise non_finite_error(names[missing[j]], part.start + bad[j])
            raise DataError(
                f"{names[missing[j]]} produced a non-finite feature (NaN or inf) on another rank; nothing was "
                "cached. Check that backbone's weights and preprocessing (mean/std options)"
            )
        distributed.barrier()
        if me == 0:
            for i in missing:
                fd, name = tempfile.mkstemp(prefix=f".{keys[i]}.", suffix=".npy.tmp", dir=self.directory)
                os.close(fd)
                try:
                    joined = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=shapes[i])
                    for r in range(world):
                        rows = distributed.shard(len(dataset), r)
                        source = np.load(shard_file(i, r), mmap_mode="r", allow_pickle=False)
                        for offset in range(0, len(rows), 4096):
                            end = min(offset + 4096, len(rows))
                            joined[rows.start + offset : rows.start + end] = source[offset:end]
                    joined.flush()
                    digest, _ = scan(joined)
                    del joined
                    os.replace(name, self.path(keys[i]))
                    self._write_sidecar(keys[i], shapes[i], digest)
                finally:
                    Path(name).unlink(missing_ok=True)
                for r in range(world):
                    shard_file(i, r).unlink(missing_ok=True)
        distributed.barrier()
        self.stats["extract_seconds"] += time.perf_counter() - start
        return len(missing)


def extracting_label(model, indices) -> str:
    """The progress label of one extraction pass: the names of the branches it extracts together."""
    return "extracting " + ", ".join(printable(model.branches[i].name) for i in indices)


def _session_runner(session):
    def run(images: torch.Tensor) -> torch.Tensor:
        x = to_channels(images.detach().float().cpu(), 3).numpy()
        return torch.from_numpy(session.run(None, {"images": x})[0])

    return run


def prefetched(batches, depth: int | None = None, stats: dict | None = None):
    """Iterate ``batches`` (a DataLoader) with up to ``depth`` batches decoded ahead by a background
    thread, so JPEG decoding and resizing overlap the forward pass (both release the GIL); the time
    spent waiting for a batch is added to ``stats["wait_seconds"]``. ``depth``: PREFETCH_BATCHES by default."""
    depth = PREFETCH_BATCHES if depth is None else depth
    stats = stats if stats is not None else {}
    stats.setdefault("wait_seconds", 0.0)
    if depth <= 0:
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            stats["wait_seconds"] += time.perf_counter() - start
            if batch is None:
                return
            yield batch
    done, stop = object(), threading.Event()
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def produce():
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put(exc)

    thread = threading.Thread(target=produce, name="fusion-engine-decode", daemon=True)
    thread.start()
    try:
        while True:
            start = time.perf_counter()
            item = ready.get()
            stats["wait_seconds"] += time.perf_counter() - start
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


@torch.inference_mode()
def run_branches(
    model,
    loader,
    indices,
    outputs,
    device,
    progress,
    runners: dict | None = None,
    stats: dict | None = None,
    precision: str = "fp32",
) -> None:
    """Fill ``outputs[j]`` with branch ``indices[j]``'s features, batch by batch: branches in ``runners``
    with their callable (onnxruntime), the others together with torch (channels_last on the CPU, in
    ``precision``: fp32, or bf16 autocast). Images are decoded a few batches ahead (:func:`prefetched`)."""
    model.eval()
    runners = runners or {}
    with_torch = [i for i in indices if i not in runners]
    with contextlib.ExitStack() as stack:
        if with_torch:
            memory_format = stack.enter_context(fast_memory_format(model, device))
            stack.enter_context(autocast(device, precision))
        row = 0
        for images, _ in prefetched(loader, stats=stats):
            found = {}
            if with_torch:
                x = images.to(device).contiguous(memory_format=memory_format)
                found.update(zip(with_torch, model.branch_features(x, with_torch)))
            for i, run in runners.items():
                found[i] = run(images)
            for out, i in zip(outputs, indices):
                out[row : row + len(images)] = found[i].float().cpu().numpy()
            row += len(images)
            progress.update(len(images))
