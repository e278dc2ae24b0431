"""Training progress that fits where it goes: a tqdm bar on a terminal; in a file (a slurm log, a
redirected run) one plain line per evaluation, and one per tenth of the steps when the last line
is at least ``min_seconds`` old.

A bar redrawn into a file writes every update (about 300 KB for a three-minute job, hundreds of
MB for a long run); the lines written instead keep a job's log to a few KB and say what a
researcher reads a log for: step, loss, best validation score, speed and time left.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, TextIO

from tqdm.auto import tqdm


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a fake stream
        return False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """The progress of one run (rank 0 only: ``enabled`` is false elsewhere)."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool, stream: TextIO | None = None,
                 every_percent: float = 10.0, min_seconds: float = 20.0) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and is_terminal(self.stream)
        self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, leave=False,
                        file=self.stream) if self.interactive else None
        self.every = max(1, round(total * every_percent / 100))
        self.start_step, self.start_time = initial, time.monotonic()
        self.min_seconds, self.last_line = min_seconds, self.start_time
        self.loss = float("nan")
        self.best = float("-inf")

    def step(self, step: int, loss: float, best: float) -> None:
        """After optimizer step ``step`` (0-based)."""
        self.loss, self.best = loss, best
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", best=f"{best:.3f}")
        elif (self.enabled and (step + 1) % self.every == 0
              and time.monotonic() - self.last_line >= self.min_seconds):
            self._line(step)

    def evaluated(self, step: int, score: float, best: float) -> None:
        self.best = best
        if self.enabled and self.bar is None:
            self._line(step, f"validation {score:.3f}")

    def _line(self, step: int, note: str = "") -> None:
        done = step + 1
        elapsed = time.monotonic() - self.start_time
        taken = done - self.start_step
        pace = f"{elapsed / taken:.2f} s/step  eta {format_seconds(elapsed / taken * (self.total - done))}" if taken else ""
        best = f"best {self.best:.3f}" if self.best > float("-inf") else "best -"
        parts = [f"{self.name}", f"step {done}/{self.total} ({100 * done / self.total:.0f}%)",
                 f"loss {self.loss:.4f}", best, note, pace]
        print("  ".join(p for p in parts if p), file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def library_bars_hidden(off_terminal_only: bool = False) -> Iterator[None]:
    """Hide transformers' own bars ("Loading weights", "Writing model shards") for a call: a
    library call should not draw on stderr, and in a log file each load would add a bar's lines.
    With ``off_terminal_only`` they stay on a terminal, where a bar costs nothing."""
    from transformers.utils import logging as hf_logging

    hide = hf_logging.is_progress_bar_enabled() and not (off_terminal_only and is_terminal(sys.stderr))
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
