"""What every task source produces, the synthetic worlds and the real files alike: ``Example`` (one
text-to-text example), ``TaskData`` (a task's three splits and what is known about them), and the
one error of a task name no source knows."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One text-to-text example."""

    source: str
    target: str


@dataclass(frozen=True)
class TaskData:
    """One task's three splits, formatted, with what is known about them."""

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: tuple[str, ...] | None  # class target strings; None for generative tasks
    metric_names: tuple[str, ...] = ("accuracy",)
    reported_metric: str = "accuracy"  # the number the paper's tables report
    # a benchmark task's examples per split, and "<official split>_rows" read from each source split
    split_sizes: dict[str, int] = field(default_factory=dict)
    relation: str = ""  # a synthetic task's planted relation: "target", "helpful", "unrelated" or "conflicting"
    split_overrides: dict[str, str] = field(default_factory=dict)  # protocol split -> the official split read instead


class UnknownTaskError(ValueError, KeyError):
    """An unknown task name: a ValueError for callers, a KeyError for dict-like lookups."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""
