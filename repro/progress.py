"""One progress convention for every long phase (preparing, training, evaluating, the nearest-neighbour search,
Figure 1): a bar on a terminal, and a line with the rate and the time left at least every `every` seconds in the
log, so `train.log` (or the console, without a terminal) says where a phase is and when it will end.

The lines are log records marked as progress: the console drops them while a bar shows the same thing, files
always keep them. `setup_logging` installs that console once per process.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("repro")
PROGRESS = {"progress": True}  # `extra=` of a progress line


def on_terminal() -> bool:
    return sys.stderr.isatty()


class ConsoleFilter(logging.Filter):
    """Keeps progress lines off the console while a bar stands for them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, "progress", False) and on_terminal())


def setup_logging() -> None:
    """The `repro` logger: INFO and up on stderr, without its progress lines when a terminal shows bars."""
    if any(isinstance(f, ConsoleFilter) for handler in log.handlers for f in handler.filters):
        return
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(ConsoleFilter())
    log.addHandler(console)
    log.setLevel(logging.INFO)
    log.propagate = False  # Hydra's own console handler would print every line twice


def number(value: float) -> str:
    """Three significant digits, thousands separated."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def duration(seconds: float) -> str:
    """A time span the way people say it: seconds, minutes, hours or days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Progress:
    """The progress of one phase of `total` units, `initial` of them done before (a resumed phase)."""

    def __init__(self, desc: str, total: int, unit: str = "it", initial: int = 0, every: float = 60.0,
                 show: bool = True):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.done = self.first = initial
        self.start = self.last = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                        disable=not (show and on_terminal()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.line(now, "".join(f", {key} {value}" for key, value in postfix.items()))

    def line(self, now: float, more: str = "") -> None:
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = f", {duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        pace = f"{number(rate)} {self.unit}/s" if rate >= 1 else f"{number(1 / rate)} s/{self.unit}" if rate > 0 \
            else "starting"
        log.info(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                 f"{pace}{left}{more}", extra=PROGRESS)

    def iterate(self, iterable):
        """`iterable`'s items, counting each as one unit; closes at the end."""
        with self:
            for item in iterable:
                yield item
                self.update()

    def close(self) -> None:
        self.bar.close()


def progress(iterable, desc: str | None, total: int, unit: str = "it", initial: int = 0, every: float = 60.0):
    """`iterable`'s items, counting each as one unit of `desc`; with `desc` None, silently."""
    return iterable if desc is None else Progress(desc, total, unit, initial, every).iterate(iterable)
