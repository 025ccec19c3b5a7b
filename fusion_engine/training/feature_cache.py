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
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import fusion_engine.training.distributed as distributed
from fusion_engine.artifacts.safe_files import read_small_file
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ConfigError, DataError, printable
from fusion_engine.runtime.export import features_runner
from fusion_engine.runtime.runtimes import autocast, fast_memory_format

CACHE_VERSION = "features-v1"
ENTRY_FORMAT = "fusion-engine-feature-entry/1"
EXTRACT_RUNTIMES = ("torch", "bf16", "onnx")
SCAN_CHUNK_BYTES = 16 << 20  # one chunk of the checking pass: memory stays bounded
MAX_SIDECAR_BYTES = 64 << 10


class FeatureCacheWarning(UserWarning):
    """A cache entry was discarded (damaged or mismatched) and is extracted again."""


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


def branch_key(model, index: int, data_digest: str, runtime: str = "torch") -> str:
    """Cache key of one branch's features on one dataset (and the extraction runtime, unless torch)."""
    branch = model.branches[index]
    spec = model.config.backbones[index]
    parts = {
        "version": CACHE_VERSION,
        "backbone": spec.name,
        "options": spec.options,
        "extractor": spec.extractor.model_dump(),
        "weights": tensors_digest(branch),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in branch.backbone.data_config.items()},
        "data": data_digest,
        # images are batched at the largest branch input size, so it shapes every branch's input too
        "loader_input_size": list(input_size_for(model)),
    }
    if runtime != "torch":  # bf16 features differ from float32 ones; onnxruntime's agree to ~1e-5
        parts["runtime"] = runtime
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


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
    """

    def __init__(self, directory=None, enabled: bool = True, runtime: str = "torch", note=None):
        if runtime not in EXTRACT_RUNTIMES:
            raise ConfigError(f"unknown extraction runtime '{runtime}'; valid: {', '.join(EXTRACT_RUNTIMES)}")
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.runtime = runtime
        self.note = note or _warn
        self.onnx_runners: dict = {}  # one export per model, branches and weights, reused by later calls
        self.stats = {"hits": 0, "extracted": 0, "extract_seconds": 0.0}
        self.discarded: list[tuple[Path, str]] = []

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
        if self.enabled:
            digest = dataset.digest()
            keys = [branch_key(model, i, digest, self.runtime) for i in range(len(model.branches))]
        else:  # nothing is looked up or stored: skip hashing the images and the weights
            keys = [""] * len(model.branches)
        shapes = [(len(dataset), b.feature_dim) for b in model.branches]
        names = [f"branch {i} ({b.name})" for i, b in enumerate(model.branches)]

        def fill(indices, buffers):
            loader = make_loader(dataset, model, batch_size, num_workers)
            with Progress(len(dataset), extracting_label(model, indices), progress) as bar:
                run_branches(model, loader, indices, buffers, device, bar, self.runtime, self.onnx_runners)

        if not distributed.active():
            return self.arrays(keys, shapes, fill, names)
        sharded = self._extract_sharded(model, dataset, keys, shapes, names, batch_size, num_workers, device, progress)
        arrays = self.arrays(keys, shapes, fill, names)  # all present now
        self.stats["hits"] -= sharded
        self.stats["extracted"] += sharded
        return arrays

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
            run_branches(model, loader, missing, buffers, device, bar, self.runtime, self.onnx_runners)
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


@torch.inference_mode()
def run_branches(
    model, loader, indices, outputs, device, progress, runtime: str = "torch", onnx_runners: dict | None = None
) -> None:
    """Fill ``outputs[j]`` with branch ``indices[j]``'s features, batch by batch, with ``runtime``:
    torch (float32; channels_last on the CPU), bf16 (bfloat16 autocast) or onnx (onnxruntime, CPU;
    the exported graph is kept in ``onnx_runners`` for the same model, branches and weights)."""
    model.eval()
    with contextlib.ExitStack() as stack:
        if runtime == "onnx":
            if torch.device(device).type != "cpu":
                raise ConfigError(
                    f"extraction runtime 'onnx' runs on the CPU, not on {device}; use 'torch' or 'bf16' "
                    "there (--extract-runtime)"
                )

            onnx_runners = {} if onnx_runners is None else onnx_runners
            key = (id(model), tuple(indices), tuple(tensors_digest(model.branches[i]) for i in indices))
            if key not in onnx_runners:
                onnx_runners[key] = features_runner(model, indices, input_size_for(model))
            run = onnx_runners[key]
        else:
            memory_format = stack.enter_context(fast_memory_format(model, device))
            stack.enter_context(autocast(device, "bf16" if runtime == "bf16" else "fp32"))

            def run(images):
                return model.branch_features(images.to(device).contiguous(memory_format=memory_format), indices)

        row = 0
        for images, _ in loader:
            features = run(images)
            for out, f in zip(outputs, features):
                out[row : row + len(images)] = f.float().cpu().numpy()
            row += len(images)
            progress.update(len(images))
