"""The Stage-II group trace, ``group_trace.jsonl``: its schema, made and read here only.

One JSON row per Stage-II step, written by the training loop (``trace_rows``)::

    {"step": 12, "similarity": {"<source>": 0.031, ...},  # each source's similarity to the target
     "kc": [0.0, 0.027, ...],  # KC of the ranked prefix of each size (index m-1: size m)
     "candidates": 6,          # sources at or above the threshold
     "group_size": 2, "group": ["<source>", ...]}  # the sources merged at this step

``GroupTraceRecorder`` is what the training loop is given for a Stage-II run (the loop itself
knows nothing of groups). Every reader goes through ``read_rows`` (the rows, tolerant of a line
being written) or ``read_trace`` (the same as arrays, for plots); ``run_lengths``,
``selection_share`` and ``step_metrics`` are the summaries the job prints, stores and tracks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

FILE_NAME = "group_trace.jsonl"
DECISION_FIELDS = ("mask", "target_sim", "kc", "num_candidates", "group_size")  # of a GroupDecision


def selected_names(source_names: Sequence[str], mask: Sequence[bool]) -> list[str]:
    """The sources a decision's mask keeps, by name, in the sources' order."""
    return [name for name, selected in zip(source_names, mask, strict=True) if selected]


def trace_rows(steps: Sequence[int], source_names: Sequence[str], mask: list[list[bool]],
               target_sim: list[list[float]], kc: list[list[float]], candidates: list[int],
               group_size: list[int]) -> list[dict[str, Any]]:
    """Rows of several steps from the per-step fields of the grouping decisions (host lists)."""
    return [
        {
            "step": step,
            "similarity": dict(zip(source_names, target_sim[i])),
            "kc": kc[i],
            "candidates": candidates[i],
            "group_size": group_size[i],
            "group": selected_names(source_names, mask[i]),
        }
        for i, step in enumerate(steps)
    ]


class GroupTraceRecorder:
    """The training loop's ``StepRecorder`` for a merging Stage-II run: a record is the step's
    ``GroupDecision`` (``method.selection``), its rows are this file's, and the module's own
    tracked state is its scales' norms (``DTVGPrompt.scale_norms``)."""

    file_name = FILE_NAME
    result_key = "group_at_best"  # in result.json; summary and tracking read it

    def __init__(self, source_names: Sequence[str]) -> None:
        self.source_names = tuple(source_names)

    def agreement(self, decision) -> torch.Tensor:
        return decision.mask

    def rows(self, steps: list[int], decisions: list) -> list[dict[str, Any]]:
        fields = {f: torch.stack([getattr(d, f) for d in decisions]).cpu().tolist() for f in DECISION_FIELDS}
        return trace_rows(steps, self.source_names, fields["mask"], fields["target_sim"], fields["kc"],
                          fields["num_candidates"], fields["group_size"])

    def metrics(self, row: dict[str, Any]) -> dict[str, float]:
        return step_metrics(row)

    def at_best(self, decision) -> list[str]:  # the sources merged into the best prompt
        return selected_names(self.source_names, decision.mask.tolist())

    def module_metrics(self, module: nn.Module) -> dict[str, float]:
        target, per_source = module.scale_norms()
        norms = {"scale_norm/target": float(target)}
        norms.update({f"scale_norm/{name}": value
                      for name, value in zip(self.source_names, per_source.tolist(), strict=True)})
        return norms


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows in step order; unreadable lines (a line being written) are skipped and a step
    written twice keeps its last row. A missing file has no rows."""
    rows: dict[int, dict] = {}
    path = Path(path)
    if path.is_file():
        with path.open(errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    rows[int(row["step"])] = row
                except (ValueError, KeyError, TypeError):
                    continue
    return [rows[step] for step in sorted(rows)]


def run_lengths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The group over time, compressed: one entry per stretch of steps with the same group."""
    spans: list[dict[str, Any]] = []
    for row in rows:
        if spans and spans[-1]["group"] == row["group"]:
            spans[-1]["last_step"] = row["step"]
        else:
            spans.append({"first_step": row["step"], "last_step": row["step"], "group": row["group"]})
    return spans


def selection_share(rows: list[dict[str, Any]], sources: Sequence[str]) -> dict[str, float]:
    """Fraction of the steps in which each source was in the group ({} without rows)."""
    return {s: sum(s in row["group"] for row in rows) / len(rows) for s in sources} if rows else {}


def step_metrics(row: dict[str, Any]) -> dict[str, float]:
    """DTVG's own signals of one step, for the tracker: each source's similarity and whether it
    is in the group, the group's size, mean target similarity (TS) and KC. The KC is that of the
    ranked prefix of the group's size: the group's own KC whenever the group is such a prefix
    (dtvg, positive_only, all_sources)."""
    sims = row["similarity"]
    size = row["group_size"]
    group = set(row["group"])
    in_group = [sim for name, sim in sims.items() if name in group]
    metrics = {f"similarity/{name}": value for name, value in sims.items()}
    metrics.update({f"in_group/{name}": float(name in group) for name in sims})
    metrics.update({"group/size": size, "group/candidates": row["candidates"],
                    "group/target_similarity": sum(in_group) / len(in_group) if in_group else 0.0,
                    "group/kc": row["kc"][size - 1] if size else 0.0})
    return metrics


@dataclass
class Trace:
    """A trace as arrays (for pictures): sources in the order of their first appearance."""

    steps: np.ndarray  # [T] int, increasing
    sources: list[str]  # [S]
    similarity: np.ndarray  # [S, T] float, NaN where missing
    selected: np.ndarray  # [S, T] bool
    group_size: np.ndarray  # [T] float
    candidates: np.ndarray  # [T] float


_CACHE: dict[str, tuple[tuple[int, int], Trace]] = {}


def read_trace(path: Path) -> Trace:
    """``read_rows`` as arrays. The last trace read is kept (keyed by path, size and mtime), so
    drawing two pictures of a long trace parses it once."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None
    cached = _CACHE.get(str(path))
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    trace = _as_arrays(read_rows(path))
    _CACHE.clear()
    if key is not None:
        _CACHE[str(path)] = (key, trace)
    return trace


def _as_arrays(rows: list[dict[str, Any]]) -> Trace:
    sources: dict[str, None] = {}
    for row in rows:
        sources.update(dict.fromkeys(row.get("similarity") or {}))
    names = list(sources)
    index = {name: i for i, name in enumerate(names)}
    similarity = np.full((len(names), len(rows)), np.nan)
    selected = np.zeros((len(names), len(rows)), dtype=bool)
    group_size = np.full(len(rows), np.nan)
    candidates = np.full(len(rows), np.nan)
    for t, row in enumerate(rows):
        values = row.get("similarity") or {}
        if list(values) == names:  # the usual case: every source, in the same order
            similarity[:, t] = [np.nan if v is None else v for v in values.values()]
        else:
            for name, value in values.items():
                similarity[index[name], t] = np.nan if value is None else float(value)
        for name in row.get("group") or []:
            if name in index:
                selected[index[name], t] = True
        group_size[t] = float(row.get("group_size", selected[:, t].sum()))
        if row.get("candidates") is not None:
            candidates[t] = float(row["candidates"])
    steps = np.asarray([int(row["step"]) for row in rows], dtype=np.int64)
    return Trace(steps, names, similarity, selected, group_size, candidates)
