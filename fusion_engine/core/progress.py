"""A minimal progress line on stderr (no dependency): redrawn on a terminal, a few lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start, self._last = 0, time.perf_counter(), -1
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        pct = int(100 * self.done / max(self.total, 1))
        if self.tty or pct // 25 != self._last // 25 or self.done >= self.total:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            end = "\n" if self.done >= self.total or not self.tty else ""
            print(
                f"\r{self.label}: {self.done}/{self.total} ({pct}%, {rate:.0f} img/s)",
                end=end,
                file=sys.stderr,
                flush=True,
            )
            self._last = pct
