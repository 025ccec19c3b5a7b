"""Every benchmark script imports and parses its options (the measurements themselves are too slow for tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "shared_data.py")


def test_every_benchmark_is_listed():
    assert {p.stem for p in SCRIPTS} >= {"transfer", "search", "overhead", "scaling", "memory", "compress"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_help(script, subprocess_env):
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, env=subprocess_env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
