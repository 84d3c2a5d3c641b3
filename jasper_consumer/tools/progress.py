"""Progress of a long tool run on stderr: a bar on a terminal, a plain line now and then
elsewhere (a log, CI), so that neither fills up with noise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """``show(fraction, text)`` as often as you like; ``finish(text)`` once at the end."""

    def __init__(self, out: TextIO, label: str, *, tty: bool | None = None,
                 every_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 width: int = 24) -> None:
        self.out = out
        self.label = label
        self.tty = out.isatty() if tty is None else tty
        self.every_s = every_s
        self.clock = clock
        self.width = width
        self._last = clock()
        self._shown = 0  # length of the bar line on the terminal

    def show(self, fraction: float, text: str) -> None:
        if self.tty:
            filled = round(self.width * max(0.0, min(1.0, fraction)))
            line = f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {text}"
            self.out.write("\r" + line.ljust(self._shown))
            self.out.flush()
            self._shown = len(line)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"{self.label}: {text}", file=self.out, flush=True)

    def finish(self, text: str) -> None:
        if self.tty and self._shown:
            self.out.write("\r" + " " * self._shown + "\r")
            self._shown = 0
        print(f"{self.label}: {text}", file=self.out, flush=True)
