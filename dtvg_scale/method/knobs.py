"""The knobs of DTVG's Stage II and their named presets, in one place.

``VARIANT_KNOBS`` lists every categorical knob with its allowed values (the first is the paper's
setting), read from the modules that implement them; the config (``stage2.<knob>``), the prompt
and the sweep's search space all check against it. ``PRESETS`` are named sets of knobs
(``stage2.preset``, or a strategy suffix such as ``dtvg-transfer``).
"""

from __future__ import annotations

from dtvg_scale.method.merge import MERGES, SCALE_INITS
from dtvg_scale.method.selection import SELECTIONS
from dtvg_scale.method.similarities import SIMILARITIES

VARIANT_KNOBS: dict[str, tuple[str, ...]] = {
    "similarity": tuple(SIMILARITIES),  # decide(similarity=...)
    "selection": SELECTIONS,  # decide(selection=...); "exact" needs K <= 16, "top_k" needs top_k
    "merge": MERGES,  # merge(mode=...); "softmax" uses target_sim and temperature
    "scale_init": SCALE_INITS,  # init_scales(mode=...); "constant" needs value
    # what ranks and thresholds the sources: task-vector similarity (the paper) or the
    # function-space transfer gain of dtvg_scale.transfer (decide(target_sim=...))
    "ranking": ("task_vector", "transfer"),
}
"""Categorical knob -> allowed values (first = the paper's default). Numeric knobs next to them:
threshold (float, 0.0), kc_weight (float or None: KC alone for greedy_prefix, 1.0 for exact),
max_group_size (int >= 1 or None), top_k (int >= 1, for selection "top_k"), temperature
(float > 0, for merge "softmax"), scale value (float, for scale_init "constant")."""

VARIANT_DEFAULTS: dict[str, str] = {knob: values[0] for knob, values in VARIANT_KNOBS.items()}
"""The paper/code setting: mean_dot, greedy_prefix, sum, ones."""

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
