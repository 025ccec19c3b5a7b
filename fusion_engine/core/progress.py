"""Progress of long phases, shown in one place, and the wall time of every phase of a run.

:class:`Progress` is the only thing in fusion-engine that draws progress. On a terminal it is a
live `tqdm <https://tqdm.github.io>`_ bar on stderr (count, elapsed time, time left, rate, and a
postfix such as the validation accuracy); when stderr is not a terminal (a log file, a pipe, CI)
each phase prints exactly one line when it ends::

    extracting resnet18, efficientnet_b0: 1600/1600 img in 12.3 s (130.1 img/s)

``enabled=False`` (``-q`` on the CLI) prints nothing. A *transient* bar (the batches inside one
fine-tuning epoch) is drawn on a terminal and erased when done; off a terminal it prints nothing,
so the phase around it keeps its one line.

:class:`PhaseClock` charges wall time to named phases; its breakdown adds an ``other`` entry for
whatever no phase claimed, so the phases always add up to the total.
"""

from __future__ import annotations

import io
import os
import sys
import time

from tqdm import tqdm


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _terminal_size(stream) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``stream``; (0, 0) when it does not say."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns, size.lines
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0, 0


def format_rate(done: float, seconds: float, unit: str) -> str:
    """``12.3 img/s``, or ``2.40 s/epoch`` below one per second (as tqdm shows slow rates)."""
    if done <= 0 or seconds <= 0:
        return f"- {unit}/s"
    rate = done / seconds
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"


def _value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Progress:
    """Progress of one phase of ``total`` steps (None: unknown) on ``stream`` (default: stderr).

    ``update(n, **postfix)`` advances it (postfix values show beside the bar and in the end line);
    reaching ``total`` ends the phase, and so do ``close()`` and leaving a ``with`` block (a phase
    that stops early, such as early stopping, says how far it got). A phase left by an exception
    prints no end line.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        enabled: bool = True,
        *,
        unit: str = "img",
        transient: bool = False,
        initial: int = 0,
        stream=None,
    ):
        self.total, self.label, self.enabled, self.unit, self.transient = total, label, enabled, unit, transient
        self.stream = sys.stderr if stream is None else stream
        self.done = self.initial = initial  # steps done before (a resumed run): not part of the rate
        self.postfix: dict = {}
        self.start = time.perf_counter()
        self.closed = False
        self.bar = None
        if enabled and is_terminal(self.stream):
            columns, rows = _terminal_size(self.stream)
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=label,
                unit=unit,
                file=self.stream,
                leave=not transient,
                # a pseudo-terminal may report 0 x 0 (tqdm then draws nothing): assume 100 x 40 there
                dynamic_ncols=columns > 0,
                ncols=None if columns > 0 else 100,
                nrows=None if rows > 0 else 40,
                mininterval=0.2,
            )

    def update(self, n: int = 1, **postfix) -> None:
        if self.closed:
            return
        self.done += n
        if postfix:
            self.set_postfix(**postfix)
        if self.bar is not None:
            self.bar.update(n)
        if self.total is not None and self.done >= self.total:
            self.close()

    def set_postfix(self, **values) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: _value(v) for k, v in self.postfix.items()}, refresh=False)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        """The phase's one line: label, count, elapsed time, rate and the postfix values."""
        elapsed = self.elapsed
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        rate = format_rate(self.done - self.initial, elapsed, self.unit)
        text = f"{self.label}: {count} {self.unit} in {elapsed:.1f} s ({rate})"
        if self.postfix:
            text += "; " + ", ".join(f"{k} {_value(v)}" for k, v in self.postfix.items())
        return text

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and not self.transient and not failed:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class PhaseClock:
    """Wall time per named phase of a run.

    ``lap(name)`` charges the time since the previous lap (or the start) to ``name``; ``phase(name)``
    is the same as a ``with`` block; ``add(name, seconds)`` charges measured time. ``breakdown()``
    adds ``other`` (the total minus every phase), so the phases sum to ``total``.
    """

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    def lap(self, name: str | None) -> float:
        """Charge the time since the previous lap to ``name`` (None: to nobody, so to ``other``); returns it."""
        now = time.perf_counter()
        seconds = now - self._last
        if name is not None:
            self.add(name, seconds)
        self._last = now
        return seconds

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    def breakdown(self, total: float | None = None, ndigits: int = 3) -> dict[str, float]:
        """``{phase: seconds, ..., "other": seconds}`` rounded to ``ndigits``; they add up to ``total``
        (default: now) up to rounding."""
        total = self.total if total is None else total
        named = {name: seconds for name, seconds in self.seconds.items() if name != "other"}
        out = {name: round(seconds, ndigits) for name, seconds in named.items()}
        out["other"] = round(max(0.0, total - sum(named.values())), ndigits)
        return out


class _Phase:
    def __init__(self, clock: PhaseClock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.clock.lap(None)

    def __exit__(self, *exc) -> None:
        self.clock.lap(self.name)


def format_phases(phases: dict[str, float], total: float, labels: dict[str, str] | None = None) -> str:
    """The end-of-run summary of ``phases`` (seconds, adding up to ``total``): one phase a line."""
    labels = labels or {}
    names = [labels.get(name, name) for name in phases]
    width = max([len(n) for n in names] + [5])
    lines = [f"wall time {total:.1f} s:"]
    for name, seconds in zip(names, phases.values()):
        share = 100 * seconds / total if total > 0 else 0.0
        lines.append(f"  {name:<{width}}  {seconds:7.1f} s  {share:5.1f}%")
    return "\n".join(lines)
