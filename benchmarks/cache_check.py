"""Cost of checking a feature-cache entry on read (sidecar, shape, dtype, sha256, finiteness).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cache_check.py          # 60000 x 1280 float32, 1 thread

Writes one synthetic entry (``--images`` x ``--dim`` float32, 293 MB by default) through
``FeatureCache.arrays`` into a temporary folder (deleted afterwards), then times, each the median
of ``--repeats`` runs:

- write: the whole ``arrays()`` call (fill + checking pass + flush + rename + sidecar), and the
  fill alone (random numbers written into the mapped file) to show what the checking pass adds;
- read, unchecked: what the cache did before the check, ``np.load(mmap_mode="r")`` (lazy: no byte is
  read), and the same plus one sequential pass over every byte (what the first epoch of training
  does with the entry anyway);
- read, checked: ``FeatureCache.read`` (sidecar, header, sha256 and finiteness in one chunked pass).

Reads are timed warm (the file in the page cache, as right after extraction or on a second run)
and cold (its pages dropped first with posix_fadvise(DONTNEED), as a shared cache read for the
first time). The check is compared with extracting the same images, at ``--extract-rate`` images/s
per branch (default 91.3: one MobileNetV2 branch, 1 thread, docs/benchmarks.md "Scaling").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def refuse(message: str) -> None:
    raise AssertionError(f"the synthetic entry was found damaged: {message}")


def full_pass(array: np.ndarray, chunk_rows: int = 4096) -> float:
    total = 0.0
    for start in range(0, len(array), chunk_rows):
        total += float(array[start : start + chunk_rows].sum(dtype=np.float64))
    return total


def median_seconds(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--dim", type=int, default=1280, help="features per image (MobileNetV2: 1280)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (hashing is single-threaded)")
    parser.add_argument("--extract-rate", type=float, default=91.3, help="images/s of extraction to compare with")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary cache folder goes")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from fusion_engine.training.feature_cache import FeatureCache

    torch.set_num_threads(args.threads)
    shape = (args.images, args.dim)
    megabytes = args.images * args.dim * 4 / 1e6
    work = Path(tempfile.mkdtemp(prefix="cache-check-", dir=args.dir))
    try:
        rng = np.random.default_rng(0)
        key = "0123456789abcdef" * 2

        def fill(_indices, buffers):
            for start in range(0, args.images, 4096):
                rows = min(4096, args.images - start)
                buffers[0][start : start + rows] = rng.standard_normal((rows, args.dim), dtype=np.float32)

        def write():
            FeatureCache(work).arrays([key], [shape], fill)

        def fill_only():
            buffer = np.lib.format.open_memmap(work / "fill.npy", mode="w+", dtype=np.float32, shape=shape)
            fill([0], [buffer])
            buffer.flush()
            del buffer
            (work / "fill.npy").unlink()

        def remove_entry():
            for path in work.glob(f"{key}.*"):
                path.unlink()

        t_write = median_seconds(write, args.repeats, remove_entry)
        t_fill = median_seconds(fill_only, args.repeats)
        entry = work / f"{key}.npy"
        cache = FeatureCache(work, note=refuse)

        def open_only():
            np.load(entry, mmap_mode="r", allow_pickle=False)

        def open_and_pass():
            full_pass(np.load(entry, mmap_mode="r", allow_pickle=False))

        def checked():
            assert cache.read(key, shape) is not None

        def cold():
            drop_from_page_cache(entry)

        results = {}
        for label, before in (("warm", None), ("cold", cold)):
            checked()  # warms the page cache (and proves the entry sound)
            results[label] = {
                "open (lazy), unchecked": median_seconds(open_only, args.repeats, before),
                "open + one pass, unchecked": median_seconds(open_and_pass, args.repeats, before),
                "checked read": median_seconds(checked, args.repeats, before),
            }
        extraction = args.images / args.extract_rate
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"entry: {args.images} x {args.dim} float32 = {megabytes:.0f} MB; {args.repeats} repeats, median")
    print(
        f"threads: {args.threads} (torch), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, numpy {np.__version__}, torch {torch.__version__}"
    )
    print(
        f"write via arrays(): {t_write:.3f} s  (fill alone {t_fill:.3f} s; the checking pass etc. add {t_write - t_fill:.3f} s)"
    )
    for label, row in results.items():
        base = row["open + one pass, unchecked"]
        for name, seconds in row.items():
            rate = megabytes / seconds if seconds > 0 else float("inf")
            print(f"read {label:4s} {name:28s} {seconds:8.3f} s  {rate:9.0f} MB/s  {seconds / base:6.2f}x one pass")
    check = results["cold"]["checked read"]
    print(
        f"extraction of {args.images} images at {args.extract_rate} images/s per branch: {extraction:.0f} s; "
        f"checked read cold {check:.2f} s = {100 * check / extraction:.2f}% of it, "
        f"warm {results['warm']['checked read']:.2f} s = {100 * results['warm']['checked read'] / extraction:.2f}%"
    )


if __name__ == "__main__":
    main()
