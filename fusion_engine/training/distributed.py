"""torch.distributed plumbing: start N local workers with torch's own launcher, and the
collective steps the training code needs (rank, barrier, clean shutdown).

Workers are started by ``torch.distributed.run`` (torchrun); running the module under
``torchrun`` directly works the same. Backend: nccl when CUDA is available, else gloo.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid

import torch
import torch.distributed as dist

from fusion_engine.errors import FusionEngineError


class DistributedError(FusionEngineError):
    """A worker of a distributed run failed."""


def launched() -> bool:
    """Whether this process was started by torchrun as one of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init() -> None:
    """Join the process group torchrun describes in the environment (idempotent)."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> int:
    """Leave the process group cleanly (a barrier first, so no rank tears down under another);
    returns the rank this process had."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    had = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return had


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (identity when not distributed)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (batch-norm statistics drift apart under DDP)."""
    if active():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def shard(n: int, of_rank: int | None = None) -> range:
    """A rank's contiguous slice of ``range(n)`` (this rank's by default); all slices partition it."""
    per, extra = divmod(n, world_size())
    r = rank() if of_rank is None else of_rank
    start = r * per + min(r, extra)
    return range(start, start + per + (1 if r < extra else 0))


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m fusion_engine ARGV`` in ``nproc`` local workers under torch.distributed.run
    (as ``torchrun --standalone``; for several nodes run torchrun yourself, see docs/scaling.md).

    A failed worker stops the whole run; the error names its rank and exit code or signal.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "fusion_engine", *argv)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise DistributedError(
            f"distributed run failed: worker rank {failed_rank} {how} (its error is printed "
            "above); the other workers were stopped. The last checkpoint (if any) is intact: "
            "rerun with --resume to continue"
        ) from None
    return 0
