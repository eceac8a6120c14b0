"""A dependency-free progress bar with rate and ETA.

On a terminal it redraws one line; otherwise (CI, log files, `nohup`) it writes
a plain log line every ``log_every_s`` seconds and once at the end, so logs stay
readable.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


def _fmt_seconds(s: float) -> str:
    if s != s or s == float("inf"):  # NaN or inf
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Counts work units and reports rate and ETA.

    Args:
      total: number of units expected (None if unknown).
      desc: short label printed before the bar.
      unit: name of one unit ("patch", "tile", ...).
      stream: where to write (default stderr).
      log_every_s: interval between log lines when the stream is not a terminal.
      enabled: False silences it entirely.

    Example:
      >>> with Progress(total=3, desc="convert", enabled=False) as bar:
      ...     for _ in range(3):
      ...         bar.update()
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "it",
        stream: IO[str] | None = None,
        log_every_s: float = 30.0,
        enabled: bool = True,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream or sys.stderr
        self.log_every_s = log_every_s
        self.enabled = enabled
        self.n = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._is_tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.n / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        elapsed = time.monotonic() - self.start
        if self.total:
            frac = min(self.n / self.total, 1.0)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            return (
                f"{self.desc} [{bar}] {self.n}/{self.total} {frac:6.1%} "
                f"{rate:.1f} {self.unit}/s elapsed {_fmt_seconds(elapsed)} ETA {_fmt_seconds(eta)}"
            )
        return f"{self.desc} {self.n} {self.unit} {rate:.1f} {self.unit}/s elapsed {_fmt_seconds(elapsed)}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        interval = 0.2 if self._is_tty else self.log_every_s
        if now - self._last_draw >= interval:
            self._draw()
            self._last_draw = now

    def _draw(self, final: bool = False) -> None:
        if self._is_tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None = None, **kwargs) -> Iterator[T]:
    """Wraps an iterable with a `Progress` bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
