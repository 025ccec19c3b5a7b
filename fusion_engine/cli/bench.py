"""``fusion-engine bench``: images/s, latency and peak memory of a saved model per runtime, side by side."""

from __future__ import annotations

import functools
import json

from fusion_engine.api.engine import load
from fusion_engine.errors import ConfigError
from fusion_engine.runtime.bench import benchmark, format_results
from fusion_engine.runtime.runtimes import ALIASES, RUNTIMES, runtime_name


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="inference speed and memory of a saved model, per runtime")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--runtime", action="append", help=f"{', '.join(RUNTIMES)} (repeatable; default: torch, channels_last, bf16)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--data", help="also report held-out accuracy per runtime on this data")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    runtimes = args.runtime or ["torch", "channels_last", "bf16"]
    unknown = [r for r in runtimes if ALIASES.get(r, r) not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime {unknown}; valid: {', '.join(RUNTIMES)}")
    runtimes = [runtime_name(r) for r in runtimes]
    results = benchmark(
        functools.partial(load, args.run_dir),
        runtimes,
        batch_size=args.batch_size,
        iterations=args.iterations,
        threads=args.threads,
        data=args.data,
    )
    print(json.dumps(results) if args.json else format_results(results))
    return 0
