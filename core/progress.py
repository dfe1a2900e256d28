"""Progress that survives `> log` and SLURM: a line with done/total, rate and ETA at least every `every_s`.

Rich bars (Lightning's, `rich.progress.track`) redraw one terminal line; in a file they print nothing
useful until the end. When stdout is not a terminal, long work reports with plain lines instead:
- `PlainLogProgress`, a Lightning callback (`python -m cli` adds it to every Trainer run), for batches, and
  `rich_progress_bar()`, the bar every Trainer shows: in `core.trainer_progress`, so that this module
  imports no Lightning (`shards` and the plain commands start without it);
- `report_progress(items, total, label)`, a generator for plain commands' loops (tars, runs, images);
- `tracked(items, total, label)`, Rich's bar on a terminal and `report_progress` lines otherwise, for loops
  that run inside a Trainer run or a command (ensemble members, tiny-model training);
- `ProgressLine` itself where a loop also marks milestones (`force=True`: the shards and feature-store
  writers print one line per tar).
All print the first step, then at most one line per `every_s` seconds, and the last step, through `print_line`:
the feature-store writer prints from its own thread beside the Trainer's batch lines, and `print` writes a line
and its newline in two calls, so two threads' lines could merge into one.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
EVERY_S = 30.0
_ONE_LINE_AT_A_TIME = threading.Lock()


def plain_output() -> bool:
    """Whether stdout is a file or pipe (SLURM, `> log`), where redrawn bars are unreadable."""
    return not sys.stdout.isatty()


def print_line(text: str | None) -> None:
    """Print `text` (if any) as one whole line, flushed, even while another thread prints progress too."""
    if text:
        with _ONE_LINE_AT_A_TIME:
            sys.stdout.write(f"{text}\n")
            sys.stdout.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _rate(per_second: float) -> str:
    """Three significant digits, never in exponent form: 0.0042 tars/s and 1234 rows/s both read."""
    return f"{per_second:.3g}" if per_second < 100 else f"{per_second:.0f}"


class ProgressLine:
    """Formats and rate-limits `label: done/total unit (pct), rate unit/s, elapsed, ETA` lines."""

    def __init__(self, label: str, total: float | None, unit: str = "items", every_s: float = EVERY_S) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.start = time.monotonic()
        self.last_print = -math.inf
        self.done = 0

    def advance(self, steps: int = 1, note: str = "", force: bool = False) -> str | None:
        """Count `steps` more finished items; the line to print, or None when the last line is recent
        (`force`: a line now, e.g. at the end of a tar)."""
        self.done += steps
        done = self.done
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if not (force or finished) and done != steps and now - self.last_print < self.every_s:
            return None
        self.last_print = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else math.inf
        known = self.total is not None and math.isfinite(self.total) and self.total > 0
        of = f"/{int(self.total)}" if known else ""
        pct = f" ({100 * done / self.total:.0f}%)" if known else ""
        eta = f", ETA {_clock((self.total - done) / rate if rate > 0 else math.inf)}" if known else ""
        return (f"{self.label}: {done}{of} {self.unit}{pct}, {_rate(rate)} {self.unit}/s, "
                f"elapsed {_clock(elapsed)}{eta}{f', {note}' if note else ''}")


def report_progress(items: Iterable[T], total: int | None, label: str, unit: str = "items",
                    every_s: float = EVERY_S, always: bool = False) -> Iterator[T]:
    """Yield `items`, printing plain progress lines (only when stdout is not a terminal, unless `always`)."""
    line = ProgressLine(label, total, unit, every_s) if always or plain_output() else None
    for item in items:
        yield item
        if line is not None:
            print_line(line.advance())


def tracked(items: Iterable[T], total: int, label: str, unit: str = "steps") -> Iterator[T]:
    """Rich's transient bar on a terminal, plain `report_progress` lines when stdout is a file or pipe (where a
    Rich bar prints nothing for the whole loop): for loops inside a command, e.g. training ensemble members."""
    if plain_output():
        yield from report_progress(items, total, label, unit)
        return
    from rich.progress import track

    yield from track(items, total=total, description=label, transient=True)
