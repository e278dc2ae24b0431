"""DTVG's configuration: every knob of Stage II's merged prompt, its allowed values, the named
presets, and the one check of them all.

``DTVGConfig`` is what a ``DTVGPrompt`` is built from. ``VARIANT_KNOBS`` lists every categorical
knob with its allowed values (the first is the paper's setting), read from the modules that
implement them; ``check_knobs`` is the only validation of the knobs (the job's ``stage2`` section
calls it with its own prefix, ``DTVGConfig`` without) and the sweep draws its search space from
``VARIANT_KNOBS``. ``PRESETS`` are named sets of knobs (``stage2.preset``, or a strategy suffix
such as ``dtvg-transfer``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dtvg_scale.method.merge import MERGES, SCALE_INITS
from dtvg_scale.method.selection import SELECTIONS
from dtvg_scale.method.similarities import SIMILARITIES
from dtvg_scale.method.strategies import MERGING_STRATEGIES, check_strategy

VARIANT_KNOBS: dict[str, tuple[str, ...]] = {
    "similarity": tuple(SIMILARITIES),  # decide(similarity=...)
    "selection": SELECTIONS,  # decide(selection=...); "exact" needs K <= 16, "top_k" needs top_k
    "merge": MERGES,  # merge(mode=...); "softmax" uses target_sim and temperature
    "scale_init": SCALE_INITS,  # init_scales(mode=...); "constant" needs scale_value
    # what ranks and thresholds the sources: task-vector similarity (the paper) or the
    # function-space transfer gain of dtvg_scale.method.transfer (decide(target_sim=...))
    "ranking": ("task_vector", "transfer"),
}
"""Categorical knob -> allowed values (the default is ``DTVGConfig``'s, ``PAPER``). Numeric knobs next to them:
threshold (float, 0.0), scale_value (float, for scale_init "constant" only) and the bounded ones of
``KNOB_BOUNDS``."""

KNOB_BOUNDS: dict[str, tuple[float, bool]] = {
    "kc_weight": (0, False),  # None: KC alone for greedy_prefix, 1.0 for exact
    "max_group_size": (1, False),
    "top_k": (1, False),  # for selection "top_k"
    "temperature": (0, True),  # for merge "softmax"
}
"""Bounded numeric knob -> (lowest, strict): it takes values >= lowest (> lowest when strict) or
None. The one statement of these ranges: ``check_knobs`` and the job's ``stage2`` options read it."""

PRESETS: dict[str, dict[str, object]] = {
    "paper": {},  # the authors' code, the default
    # the variant that kept every conflicting source out on the controlled benchmark (0 of 1500
    # steps, 10 runs) at a target score within the paper's spread (docs/results.md, "Which variant
    # when"): centering removes the component every task vector shares
    "centered": {"similarity": "centered_all"},
    # rank sources by how well their own Stage-I prompt already does on the target's training
    # examples (function space), not by task-vector similarity: on the controlled benchmark it put
    # the planted helpful pair on top in 10 of 10 runs, the paper's mean_dot in 3
    # (benchmarks/controlled/relatedness.py)
    "transfer": {"ranking": "transfer"},
}
"""``stage2.preset`` -> the Stage-II knobs it sets; knobs given explicitly win over the preset."""


PRESET_SEPARATOR = "-"


def split_strategy(name: str) -> tuple[str, str | None]:
    """``"dtvg-transfer"`` -> ``("dtvg", "transfer")``; ``"dtvg"`` -> ``("dtvg", None)``. Raises
    ValueError naming what is known when the strategy, the preset or the pair is not."""
    strategy, separator, preset = name.partition(PRESET_SEPARATOR)
    check_strategy(strategy)
    if not separator:
        return strategy, None
    if strategy not in MERGING_STRATEGIES:
        raise ValueError(f"strategy {name!r}: a preset applies to merging strategies ({', '.join(MERGING_STRATEGIES)})")
    if preset not in PRESETS:
        raise ValueError(f"strategy {name!r}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return strategy, preset


def check_knobs(knobs: dict[str, Any], prefix: str = "") -> None:
    """Raise ValueError naming the first knob of ``knobs`` (names as in ``DTVGConfig``, a subset
    is fine) that is not allowed, as ``<prefix><knob>``."""
    if "preset" in knobs and knobs["preset"] not in PRESETS:
        raise ValueError(f"unknown {prefix}preset {knobs['preset']!r}; known: {', '.join(PRESETS)}")
    if "strategy" in knobs and knobs["strategy"] not in MERGING_STRATEGIES:
        raise ValueError(f"{prefix}strategy {knobs['strategy']!r}: a DTVG prompt merges task vectors; "
                         f"its strategy is one of {', '.join(MERGING_STRATEGIES)}")
    for knob, allowed in VARIANT_KNOBS.items():
        if knob in knobs and knobs[knob] not in allowed:
            raise ValueError(f"unknown {prefix}{knob} {knobs[knob]!r}; known: {', '.join(allowed)}")
    if "scale_init" in knobs and (knobs["scale_init"] == "constant") != (knobs.get("scale_value") is not None):
        raise ValueError(f"{prefix}scale_init=constant needs {prefix}scale_value (a number)"
                         if knobs["scale_init"] == "constant" else
                         f"{prefix}scale_value is for {prefix}scale_init=constant only, got "
                         f"{prefix}scale_init={knobs['scale_init']}")
    if knobs.get("selection") == "top_k" and knobs.get("top_k") is None:
        raise ValueError(f"{prefix}selection=top_k needs {prefix}top_k (an integer >= 1)")
    for knob, (lowest, strict) in KNOB_BOUNDS.items():
        value = knobs.get(knob)
        if value is not None and (value <= lowest if strict else value < lowest):
            raise ValueError(f"{prefix}{knob} must be {'>' if strict else '>='} {lowest}, got {value!r}")


@dataclass(frozen=True)
class DTVGConfig:
    """One Stage-II merged prompt's knobs; the defaults are the paper's (the authors' code).
    ``stage2.<knob>`` in the job's config sets each (``--help`` describes them)."""

    strategy: str = "dtvg"  # dtvg or an ablation that merges (method/strategies.py)
    threshold: float = 0.0  # sources whose similarity (or transfer gain) is >= this are candidates
    kc_weight: float | None = None  # None: KC alone (the code); a number: TS + kc_weight * KC (the paper)
    max_group_size: int | None = None
    similarity: str = "mean_dot"
    selection: str = "greedy_prefix"
    merge: str = "sum"
    scale_init: str = "ones"
    scale_value: float | None = None  # every source scale's start with scale_init=constant
    top_k: int | None = None  # the group size of selection=top_k
    temperature: float = 1.0  # of merge=softmax
    ranking: str = "task_vector"  # or transfer: rank by the measured transfer gains

    def __post_init__(self) -> None:
        check_knobs(dataclasses.asdict(self))


PAPER = DTVGConfig()
"""Every knob at the paper's setting (the authors' code): the defaults of the job's ``stage2.*``."""

VARIANT_DEFAULTS: dict[str, str] = {knob: getattr(PAPER, knob) for knob in VARIANT_KNOBS}
"""The paper/code setting of each categorical knob: mean_dot, greedy_prefix, sum, ones, task_vector
(named, not the first of a list: a variant added anywhere in its registry changes no default)."""
