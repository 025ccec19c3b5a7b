"""Frozen-branch feature extraction with a persistent on-disk cache.

Each branch's features for a dataset are one float32 ``.npy`` file named by a key over
the branch's config, its weights (a digest of the actual tensors), its preprocessing and
the data digest; features are written in chunks to a memory-mapped file, so memory stays
bounded whatever the dataset size, and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fusion_engine.training.distributed as distributed
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.core.progress import Progress
from fusion_engine.errors import ConfigError, DataError
from fusion_engine.runtime.export import features_runner
from fusion_engine.runtime.runtimes import autocast, fast_memory_format

CACHE_VERSION = "features-v1"
EXTRACT_RUNTIMES = ("torch", "bf16", "onnx")


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


class FeatureCache:
    """Feature arrays on disk, filled once; ``stats`` counts hits and extractions."""

    def __init__(self, directory=None, enabled: bool = True, runtime: str = "torch"):
        if runtime not in EXTRACT_RUNTIMES:
            raise ConfigError(f"unknown extraction runtime '{runtime}'; valid: {', '.join(EXTRACT_RUNTIMES)}")
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.runtime = runtime
        self.onnx_runners: dict = {}  # one export per model, branches and weights, reused by later calls
        self.stats = {"hits": 0, "extracted": 0, "extract_seconds": 0.0}

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def arrays(self, keys: list[str], shapes: list[tuple[int, int]], fill) -> list[np.ndarray]:
        """The cached arrays for ``keys``; missing ones are created and written by ``fill(indices, arrays)``.

        Arrays are filled in a temporary memory-mapped file and renamed into place when
        complete, so an interrupted run leaves no partial cache entry.
        """
        out: list[np.ndarray | None] = [None] * len(keys)
        if self.enabled:
            for i, key in enumerate(keys):
                if self.path(key).is_file():
                    out[i] = np.load(self.path(key), mmap_mode="r")
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
            for j, i in enumerate(missing):
                if self.enabled:
                    buffers[j].flush()
                    os.replace(tmp_paths[j], self.path(keys[i]))
                    out[i] = np.load(self.path(keys[i]), mmap_mode="r")
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

        def fill(indices, buffers):
            loader = make_loader(dataset, model, batch_size, num_workers)
            run_branches(
                model,
                loader,
                indices,
                buffers,
                device,
                Progress(len(dataset), "extracting features", progress),
                self.runtime,
                self.onnx_runners,
            )

        if not distributed.active():
            return self.arrays(keys, shapes, fill)
        sharded = self._extract_sharded(model, dataset, keys, shapes, batch_size, num_workers, device, progress)
        arrays = self.arrays(keys, shapes, fill)  # all present now
        self.stats["hits"] -= sharded
        self.stats["extracted"] += sharded
        return arrays

    def _extract_sharded(self, model, dataset, keys, shapes, batch_size, num_workers, device, progress) -> int:
        """Collective: each rank extracts its slice of the images (each image exactly once) into a
        shard file; rank 0 joins the shards into the same cache entries a single process writes."""
        if not self.enabled:
            raise DataError("distributed extraction writes its shards through the feature cache; drop --no-cache")
        missing = [i for i, key in enumerate(keys) if not self.path(key).is_file()]
        distributed.barrier()  # every rank has decided what is missing before anything is written
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
        run_branches(
            model,
            loader,
            missing,
            buffers,
            device,
            Progress(len(part), f"extracting features (rank {me}/{world})", progress and me == 0),
            self.runtime,
            self.onnx_runners,
        )
        for buffer in buffers:
            buffer.flush()
        del buffers
        distributed.barrier()
        if me == 0:
            for i in missing:
                fd, name = tempfile.mkstemp(prefix=f".{keys[i]}.", suffix=".npy.tmp", dir=self.directory)
                os.close(fd)
                joined = np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=shapes[i])
                for r in range(world):
                    rows = distributed.shard(len(dataset), r)
                    source = np.load(shard_file(i, r), mmap_mode="r")
                    for offset in range(0, len(rows), 4096):
                        end = min(offset + 4096, len(rows))
                        joined[rows.start + offset : rows.start + end] = source[offset:end]
                joined.flush()
                os.replace(name, self.path(keys[i]))
                for r in range(world):
                    shard_file(i, r).unlink(missing_ok=True)
        distributed.barrier()
        self.stats["extract_seconds"] += time.perf_counter() - start
        return len(missing)


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
