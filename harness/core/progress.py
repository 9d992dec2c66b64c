"""Progress of long work (training steps, gates, calibration seeds, sweep runs) with an ETA.

On a terminal: a tqdm bar on stderr. Elsewhere (Slurm logs, CI, a GPU lease's captured output):
one plain line each time another ~10 % is done, so a log shows progress without a line per step."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _clock(s: float) -> str:
    s = int(max(0.0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`update_to(n)` as work advances; `close()` (or a with-block) at the end."""

    def __init__(self, total: int, desc: str, unit: str = "steps", stream: TextIO | None = None,
                 tty: bool | None = None, every: float = 0.1, rate_from_start: bool = False) -> None:
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self.n = 0
        self._t0 = time.monotonic()
        # a training's rate counts from its first step (start-up is no step); a sweep's runs or a
        # calibration's seeds count from the start
        self._first: tuple[float, int] | None = (self._t0, 0) if rate_from_start else None
        self._next_frac = every
        self._bar = None
        if self.tty and self.total:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}", file=self.stream, leave=False,
                             dynamic_ncols=True, mininterval=0.5)

    def update_to(self, n: int) -> None:
        n = min(int(n), self.total) if self.total else int(n)
        if n <= self.n:
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
        if self._first is None:
            self._first = (time.monotonic(), n)
        self.n = n
        if self._bar is None and self.total:
            frac = n / self.total
            if frac + 1e-9 >= self._next_frac:
                # the next multiple of `every` above frac, computed (a loop of every=1e-9 steps
                # spun for minutes per update)
                self._next_frac = (math.floor((frac + 1e-9) / self.every) + 1) * self.every
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def eta_s(self) -> float | None:
        if self._first is None or self.n <= self._first[1] or not self.total:
            return None
        t1, n1 = self._first
        return (time.monotonic() - t1) / (self.n - n1) * (self.total - self.n)

    def line(self) -> str:
        el = time.monotonic() - self._t0
        eta = self.eta_s()
        pct = 100 * self.n / self.total if self.total else 0
        return (f"  [{self.desc}] {self.n}/{self.total} {self.unit} ({pct:.0f} %), {_clock(el)} elapsed"
                + (f", ETA {_clock(eta)}" if eta is not None and self.n < self.total else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
