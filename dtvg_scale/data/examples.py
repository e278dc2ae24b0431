"""The one example type every task source produces: the synthetic worlds and the real files."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One text-to-text example."""

    source: str
    target: str
