"""Progress output (``core/progress.py``): one line per phase off a terminal, nothing when quiet, a live tqdm
bar with count, elapsed time, time left and rate on a terminal; phase times that add up to the total.

Under pytest stderr is captured, so it is not a terminal: that is the non-terminal mode. The terminal
mode is driven through a fake tty stream."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from fusion_engine.api.engine import Engine
from fusion_engine.core.progress import PhaseClock, Progress, format_phases, format_rate
from fusion_engine.search.candidates import Candidate
from fusion_engine.search.config import SearchConfig
from fusion_engine.search.selection import Searcher
from fusion_engine.training.config import TrainConfig

LINE = re.compile(r"^(?P<label>.+): (?P<count>\d+(/\d+)?) (?P<unit>\w+) in \d+\.\d s \([^)]*(/s|s/\w+)\)(; .+)?$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_phase_prints_exactly_one_line_at_its_end_off_a_terminal(capsys):
    bar = Progress(5, "extracting resnet18, efficientnet_b0", unit="img")
    for _ in range(4):
        bar.update(1)
    assert capsys.readouterr().err == ""  # nothing while the phase runs
    bar.update(1, val_accuracy=0.5)  # reaching the total ends the phase
    bar.update(1)  # (past the end: nothing more)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    match = LINE.match(lines[0])
    assert match, lines[0]
    assert match["label"] == "extracting resnet18, efficientnet_b0" and match["count"] == "5/5"
    assert match["unit"] == "img" and "val_accuracy 0.5000" in lines[0]


def test_a_phase_that_stops_early_says_how_far_it_got(capsys):
    with Progress(40, "head training", unit="epoch") as bar:
        for _ in range(12):
            bar.update(1, best=0.9)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("head training: 12/40 epoch in ") and "best 0.9000" in lines[0]


def test_quiet_transient_and_failed_phases_print_nothing(capsys):
    with Progress(3, "quiet", enabled=False) as bar:
        bar.update(3)
    with Progress(3, "batches of one epoch", transient=True) as bar:
        bar.update(3)
    with pytest.raises(RuntimeError), Progress(3, "failing") as bar:
        bar.update(1)
        raise RuntimeError("boom")
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_live_bar_with_count_elapsed_time_left_and_rate():
    stream = FakeTerminal()
    with Progress(4, "extracting test_resnet", unit="img", stream=stream) as bar:
        assert bar.bar is not None  # tqdm draws it
        for _ in range(4):
            bar.update(1, val_accuracy=0.75)
    out = stream.getvalue()
    assert "extracting test_resnet" in out and "4/4" in out
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", out), out  # elapsed<time left
    assert "img/s" in out and "val_accuracy=0.7500" in out
    assert "\r" in out  # redrawn in place, not one line per update


def test_quiet_on_a_terminal_draws_nothing():
    stream = FakeTerminal()
    with Progress(4, "quiet", enabled=False, stream=stream) as bar:
        bar.update(4)
    assert stream.getvalue() == "" and bar.bar is None


def test_slow_rates_read_as_seconds_per_step():
    assert format_rate(10, 2.0, "img") == "5.0 img/s"
    assert format_rate(2, 5.0, "epoch") == "2.50 s/epoch"
    assert format_rate(0, 1.0, "row") == "- row/s"


def test_phases_add_up_to_the_total():
    clock = PhaseClock()
    sum(range(10000))
    clock.lap("setup")
    with clock.phase("extraction"):
        sum(range(10000))
    sum(range(10000))  # between phases: nobody's, so "other"
    clock.add("head", 0.0)
    clock.lap("evaluation")
    total = clock.total
    phases = clock.breakdown(total)
    assert list(phases) == ["setup", "extraction", "head", "evaluation", "other"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(total, abs=0.001 * len(phases))  # rounding only
    text = format_phases(phases, total, {"head": "head training"})
    assert text.splitlines()[0] == f"wall time {total:.1f} s:"
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["setup", "extraction", "head", "evaluation", "other"]


def test_the_search_shows_one_line_per_selection_step(capsys):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    candidates = [
        Candidate(f"c{i}", {}, 4, 0, None, 0.0, True, (rng.normal(size=(90, 4)) + y[:, None] * (i + 1)).astype("f4"))
        for i in range(2)
    ]
    searcher = Searcher(
        Engine.from_plugins(),
        candidates,
        y,
        len(y),
        3,
        SearchConfig(folds=2, epochs=2, max_branches=2),
        TrainConfig(device="cpu"),
        "cpu",
        lambda *a, **k: None,
        progress=True,
    )
    searcher.run([{"name": "concat"}], {"name": "concat"})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in lines] == [
        "search: subsets of 1 backbone(s)",
        "search: subsets of 2 backbone(s)",
    ], lines
    assert all(LINE.match(line) for line in lines) and " row in " in lines[0]
