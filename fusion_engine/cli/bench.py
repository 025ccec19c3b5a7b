"""``fusion-engine bench``: images/s, latency and peak memory of a saved model per runtime, side by side."""

from __future__ import annotations

import functools
import json

from fusion_engine.api.engine import load
from fusion_engine.cli.common import add_key_options, encryption_key
from fusion_engine.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    ExportError,
    FusionEngineError,
    PluginError,
    WeightsError,
    printable,
)
from fusion_engine.runtime.bench import benchmark, format_results
from fusion_engine.runtime.runtimes import ALIASES, RUNTIMES, runtime_name


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="inference speed and memory of a saved model, per runtime")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--runtime",
        action="append",
        help=f"{', '.join(RUNTIMES)} (repeatable; default: torch, channels_last, bf16; int8 calibrates on --data)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--data", help="also report held-out accuracy per runtime on this data")
    add_key_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    runtimes = args.runtime or ["torch", "channels_last", "bf16"]
    unknown = [r for r in runtimes if ALIASES.get(r, r) not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime {unknown}; valid: {', '.join(RUNTIMES)}")
    runtimes = [runtime_name(r) for r in runtimes]
    # every measuring process loads (and checks) RUN_DIR itself, with the same key options
    load_model = functools.partial(load, args.run_dir, public_key=args.public_key, encryption_key=encryption_key(args))
    results = benchmark(
        load_model,
        runtimes,
        batch_size=args.batch_size,
        iterations=args.iterations,
        threads=args.threads,
        data=args.data,
    )
    if all("error" in r for r in results):
        raise _error_type(results)(f"every runtime failed ({', '.join(runtimes)}): {_errors(results)}")
    print(json.dumps(results) if args.json else format_results(results))
    return 0


def _errors(results: list[dict]) -> str:
    """The distinct errors of ``results`` (each "Type: message"), first line of each, escaped, in one line."""
    first_lines = [printable(r["error"].strip().splitlines()[0]) if r["error"].strip() else "?" for r in results]
    return "; ".join(dict.fromkeys(first_lines))


def _error_type(results: list[dict]) -> type:
    """The project's error type all ``results`` failed with (ArtifactError for a tampered RUN_DIR), else the base."""
    known = {e.__name__: e for e in (ArtifactError, ConfigError, DataError, ExportError, PluginError, WeightsError)}
    names = {r["error"].split(":", 1)[0] for r in results}
    return known.get(names.pop(), FusionEngineError) if len(names) == 1 else FusionEngineError
