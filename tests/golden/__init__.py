"""Golden results: what a run decided and scored, pinned in this folder (issue 12: a redesign keeps behaviour).

``snapshot(run_dir)`` reads a ``train.py`` run folder into one dict: its ``results.json`` (every
score, group at the best step, SPoT's source, sharding) and every Stage-II ``group_trace.jsonl``
(per step: similarities, KC, candidates, group). ``check(snapshot, name)`` compares it with
``tests/golden/<name>.json``: names, groups, counts and strings exactly, floats to a relative
1e-6 (a refactor may reorder a sum; a changed decision is never within that). Scores are counts
over 128 or fewer examples, so they compare exactly too.

To rewrite a golden file after a deliberate change of behaviour, run its test with
``DTVG_UPDATE_GOLDEN=1`` and say in the commit why the numbers moved.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REL, ABS = 1e-6, 1e-9


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot(run_dir: Path) -> dict[str, Any]:
    traces = {path.parent.name: read_jsonl(path) for path in sorted((run_dir / "stage2").glob("*/group_trace.jsonl"))}
    return {"results": json.loads((run_dir / "results.json").read_text()), "group_traces": traces}


def differences(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Every place where ``actual`` departs from ``expected``, as ``path: actual != expected``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if list(actual) != list(expected):
            return [f"{where}: keys {list(actual)} != {list(expected)}"]
        return [d for key in expected for d in differences(actual[key], expected[key], f"{where}/{key}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items != {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in differences(a, e, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if math.isclose(actual, expected, rel_tol=REL, abs_tol=ABS) else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected and type(actual) is type(expected) else [f"{where}: {actual!r} != {expected!r}"]


def dumps(value: Any, indent: str = "") -> str:
    """JSON with a dict's keys one per line and a list's items one per line, each item (a trace
    row, a group) on a single line: a changed decision shows as one changed line in a diff."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        rows = [f"{inner}{json.dumps(key)}: {dumps(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(rows) + f"\n{indent}}}"
    if isinstance(value, list) and value and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + json.dumps(item) for item in value) + f"\n{indent}]"
    return json.dumps(value)


def check(actual: dict[str, Any], name: str) -> None:
    path = HERE / f"{name}.json"
    if os.environ.get("DTVG_UPDATE_GOLDEN") == "1":
        path.write_text(dumps(actual) + "\n")
        return
    assert path.is_file(), f"no golden file {path}: run this test once with DTVG_UPDATE_GOLDEN=1"
    found = differences(actual, json.loads(path.read_text()))
    assert not found, f"{len(found)} differences from {path.name} (first 20):\n" + "\n".join(found[:20])
