"""A one-line progress bar for the command line: done/total, rate and a metric, on stderr."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Redraws ``label [####----] done/total  rate unit/s  name=value`` on ``stream``.

    The rate is measured from the first update on, so compilation before it does not
    drag the rate down; the first update shows none (a bar made at the first result has no
    time to divide by). On a stream that is not a terminal each update is its own line.
    """

    def __init__(self, total: int, label: str = "", unit: str = "steps", stream=None, width: int = 24):
        self.total, self.label, self.unit, self.width = total, label, unit, width
        self.stream = sys.stderr if stream is None else stream
        self._first: tuple[int, float] | None = None

    def _rate(self, done: int, now: float) -> str:
        """``"R unit/s"`` since the first update, or ``""`` before there is a second."""
        if self._first is None or now <= self._first[1] or done <= self._first[0]:
            return ""
        return f"{(done - self._first[0]) / (now - self._first[1]):.2f} {self.unit}/s"

    def update(self, done: int, **metrics: float) -> None:
        """Shows ``done`` of ``total`` and the given metrics."""
        now = time.perf_counter()
        rate = self._rate(done, now)
        if self._first is None:
            self._first = (done, now)
        filled = int(self.width * min(done, self.total) / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        shown = "  ".join(f"{name}={value:.4g}" for name, value in metrics.items())
        line = "  ".join(part for part in (f"{self.label} [{bar}] {done}/{self.total}".strip(), rate, shown) if part)
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(("\r" + line) if tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar's line on a terminal."""
        if getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()
