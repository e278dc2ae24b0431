"""Stage-II strategies: DTVG and every ablation of the paper, as pure tensor code.

A strategy turns one grouping decision (``selection.GroupDecision``) into the mask of sources
merged this step. All of them keep the target's own task vector and its scales; ``spot`` is the
exception: it picks one source prompt once, then trains a plain prompt (no merge at all).

- ``dtvg``: the group DTVG chooses, re-chosen at every step.
- ``positive_only``: every source with similarity >= threshold (no knowledge-consistency step).
- ``target_only``: no source; only the target's vector and its scales.
- ``all_sources``: every source, no grouping.
- ``fixed_group``: the DTVG group of the first step, kept for the whole run.
- ``spot``: SPoT; start from the most cosine-similar source prompt, then plain prompt tuning.

A merging strategy may name a ``stage2.preset`` after a dash, ``dtvg-transfer``: the same
strategy with that preset's knobs over the job's, run beside the others from the same Stage I
(its folder, results and table row are named so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtvg_scale.method.selection import GroupDecision

STRATEGIES: tuple[str, ...] = ("dtvg", "positive_only", "target_only", "all_sources", "fixed_group", "spot")
MERGING_STRATEGIES: tuple[str, ...] = tuple(s for s in STRATEGIES if s != "spot")


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")


def strategy_mask(
    name: str,
    decision: GroupDecision,
    threshold: float,
    fixed_mask: Tensor,
    fixed_decided: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The sources merged this step under strategy ``name``.

    ``fixed_mask``/``fixed_decided`` are the state of ``fixed_group`` (the first decision and
    whether it was taken); they are returned updated, as tensors, so no strategy syncs with
    the host and every rank takes the same path.
    """
    if name == "dtvg":
        mask = decision.mask
    elif name == "positive_only":
        mask = decision.target_sim >= threshold
    elif name == "target_only":
        mask = torch.zeros_like(decision.mask)
    elif name == "all_sources":
        mask = torch.ones_like(decision.mask)
    elif name == "fixed_group":
        mask = torch.where(fixed_decided, fixed_mask, decision.mask)
        fixed_mask = mask
        fixed_decided = torch.ones_like(fixed_decided)
    else:
        raise ValueError(f"strategy {name!r} does not merge task vectors; known: {', '.join(MERGING_STRATEGIES)}")
    return mask, fixed_mask, fixed_decided


def spot_source(target_prompt: Tensor, source_prompts: Tensor) -> Tensor:
    """Index of the source prompt most similar to the target's (SPoT): cosine of token means,
    as in the authors' ``SPoT_Sim``. ``target_prompt`` [r, d], ``source_prompts`` [K, r, d]."""
    if source_prompts.shape[0] == 0:
        raise ValueError("SPoT needs at least one source prompt")
    target_mean = target_prompt.float().mean(dim=0)
    source_means = source_prompts.float().mean(dim=1)
    cosine = torch.nn.functional.cosine_similarity(source_means, target_mean.unsqueeze(0), dim=-1)
    return cosine.argmax()
