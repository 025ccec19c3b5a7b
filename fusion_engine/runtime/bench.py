"""``fusion-engine bench``: images/s, per-batch latency p50/p95 and peak memory per runtime, side by side.

Each runtime is measured in its own fresh process, so peak memory is that runtime's alone.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from queue import Empty

import numpy as np
import torch

from fusion_engine.core.data import align_classes, load_dataset
from fusion_engine.core.loader import make_loader
from fusion_engine.core.network import input_size_for
from fusion_engine.errors import printable
from fusion_engine.runtime.runtimes import make_runner


def _measure(load_model, runtime: str, batch_size: int, iterations: int, threads: int, data, queue) -> None:
    torch.set_num_threads(threads)
    try:
        model = load_model()
        height, width = input_size_for(model)
        images = torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
        run = make_runner(model, runtime, example=images, calibration=data)  # int8: calibrated on the data
        for _ in range(3):
            run(images)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - start)
        result = {
            "runtime": runtime,
            "images_per_second": batch_size * len(times) / sum(times),
            "p50_ms": 1000 * float(np.percentile(times, 50)),
            "p95_ms": 1000 * float(np.percentile(times, 95)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if data is not None:
            dataset = align_classes(model, load_dataset(data))
            correct = sum(int((run(x).argmax(1) == y).sum()) for x, y in make_loader(dataset, model, batch_size))
            result["accuracy"] = correct / len(dataset)
        queue.put(result)
    except Exception as exc:  # reported in the table, the other runtimes still run
        queue.put({"runtime": runtime, "error": f"{type(exc).__name__}: {exc}"})


def _result_of(process, queue, runtime: str) -> dict:
    """The measuring process's result, or an error row when it dies without one (crash, out of memory)."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not process.is_alive():
                return {"runtime": runtime, "error": f"the measuring process died (exit code {process.exitcode})"}


def benchmark(
    load_model, runtimes, *, batch_size: int = 32, iterations: int = 20, threads: int | None = None, data=None
) -> list[dict]:
    """One result dict per runtime, each measured in a fresh spawned process.

    ``load_model`` is a picklable callable that returns the model in that process, for example
    ``functools.partial(fusion_engine.load, RUN_DIR, public_key=..., encryption_key=...)``: each process
    loads, and so checks, RUN_DIR itself. A runtime that fails is a result with an ``error`` ("Type: message").
    """
    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    results = []
    for runtime in runtimes:
        queue = context.Queue()
        process = context.Process(
            target=_measure, args=(load_model, runtime, batch_size, iterations, threads, data, queue)
        )
        process.start()
        results.append(_result_of(process, queue, runtime))
        process.join()
    return results


ACCURACY_TOLERANCE = 0.005  # a runtime whose top-1 moves more than this from the first runtime's is flagged


def format_results(results: list[dict]) -> str:
    """A table, speed relative to the first runtime; accuracy changes beyond 0.5 points are flagged."""
    lines = [f"{'runtime':<20}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'peak MB':>10}{'accuracy':>10}"]
    base = next((r for r in results if "images_per_second" in r), None)
    notes = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['runtime']:<20}failed: {printable(r['error'])}")
            continue
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        speed = f" ({r['images_per_second'] / base['images_per_second']:.2f}x)" if base else ""
        if "accuracy" in r and "accuracy" in base and r is not base:
            change = r["accuracy"] - base["accuracy"]
            speed += f" {100 * change:+.2f} pt"
            if abs(change) > ACCURACY_TOLERANCE:
                notes.append(
                    f"note: {r['runtime']} changes top-1 by {100 * change:+.2f} points vs {base['runtime']} "
                    f"(more than {100 * ACCURACY_TOLERANCE:.1f}); check it on your own held-out data"
                )
        lines.append(
            f"{r['runtime']:<20}{r['images_per_second']:>10.1f}{r['p50_ms']:>10.1f}{r['p95_ms']:>10.1f}"
            f"{r['peak_rss_mb']:>10.0f}{acc:>10}{speed}"
        )
    return "\n".join(lines + notes)
