"""Every benchmark script imports and parses its options (the measurements themselves are too slow for tests)."""

from __future__ import annotations

import json
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


def run_on_shared_data(script: str, args: list[str], shared_dir, subprocess_env) -> subprocess.CompletedProcess:
    """Run a benchmark script on ../shared's data; it must succeed."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        env={**subprocess_env, "FUSION_ENGINE_SHARED": str(shared_dir)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_top_blocks_runs_a_tiny_split_with_flip_average_independent_branches_and_paired_margins(
    shared_dir, subprocess_env, tmp_path
):
    out = tmp_path / "rows.json"
    weights = "mobilenetv1_025.tf1_quant_in1k,mobilenetv1_050.tf1_quant_in1k"
    args = ["--dataset", "cifar", "--limit", "200", "--held-out", "60", "--weights", weights, "--input-size", "32",
            "--rows", "0,1:flip+flip-average,1:flip+independent", "--epochs", "2", "--speed-images", "8", "--baselines",
            "--single-rivals", "--json", str(out)]  # fmt: skip
    result = run_on_shared_data("top_blocks.py", args, shared_dir, subprocess_env)
    frozen, averaged, independent = json.loads(out.read_text())["rows"]
    assert "held_out_without_flip_average" in averaged and "held_out_without_flip_average" not in frozen
    for row in (frozen, averaged):
        assert 0 < row["two_se_vs_handcrafted"] < 2 * (2 * 0.25 / 60) ** 0.5  # paired: at most the independent bound
    assert "| 1:flip+flip-average |" in result.stdout
    for row in (frozen, averaged):  # each backbone alone, trained as the row says
        assert set(row["singles"]) == set(weights.split(","))
        assert row["vs_best_single"] == pytest.approx(row["held_out_accuracy"] - max(row["singles"].values()), abs=2e-4)
        assert 0 < row["singles_averaged"] <= 1 and row["two_se_singles_averaged_vs_best_single"] >= 0
    alone = independent["branches_alone"]  # the vote's branches, each trained apart: the best one alone beside it
    assert len(alone) == 2 and "branches_alone" not in averaged
    assert independent["vs_best_alone"] == pytest.approx(
        independent["held_out_accuracy"] - max(alone.values()), abs=2e-4
    )
    assert "the vote of branches trained apart" in result.stdout


def test_search_trains_the_winner_as_train_flags_say(shared_dir, subprocess_env, tmp_path):
    out = tmp_path / "search.json"
    args = ["--dataset", "cifar", "--limit", "120", "--cache-dir", str(tmp_path / "cache"), "--time-budget", "0.5",
            "--max-branches", "1", "--folds", "2", "--no-recompute", "--train-blocks", "1", "--independent-branches",
            "--views", "flip,flip-average", "--epochs", "1", "--out", str(tmp_path / "run"), "--json", str(out)]  # fmt: skip
    run_on_shared_data("search.py", args, shared_dir, subprocess_env)
    summary = json.loads(out.read_text())
    config = summary["train_config"]
    assert (config["train_blocks"], config["independent_branches"], config["epochs"]) == (1, True, 1)
    assert (config["feature_views"], config["flip_average"]) == (["flip"], True)
    assert summary["winner_config"]["fusion"]["name"] == "vote"  # the only built-in fusion with a head per branch
    assert 0 <= summary["searched_held_out"] <= 1
