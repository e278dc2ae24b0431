"""The one example type every task source produces (the synthetic worlds and the real files), and
the one error of a task name no source knows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One text-to-text example."""

    source: str
    target: str


class UnknownTaskError(ValueError, KeyError):
    """An unknown task name: a ValueError for callers, a KeyError for dict-like lookups."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""
