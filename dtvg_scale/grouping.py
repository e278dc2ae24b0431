"""The DTVG grouping rule as pure tensor code: similarity, knowledge consistency, group choice.

Zhang et al., "Dynamic Task Vector Grouping for Efficient Multi-Task Prompt Tuning" (Findings of
ACL 2025), Stage II. The authors' code (zpy2477/DTVG, ``peft/soft_prompt_controller.py``,
ablation 0) does, at every forward pass:

1. ``s_k = sim(U_t, U_k)`` for the scaled target vector ``U_t`` and each scaled source ``U_k``.
2. candidates are the sources with ``s_k >= threshold``, ranked by ``s_k`` descending
   (Python's stable sort: ties keep the sources' order).
3. the knowledge consistency KC of the first ``m`` ranked candidates is the mean of
   ``sim(U_i, U_j)`` over ordered pairs ``i != j`` of them, and 0 for ``m = 1``.
4. the group is the ranked prefix with the largest KC (first maximum, so ties go to the smaller
   group); no candidate means an empty group.

Their code loops over sources and pairs in Python with a host sync per comparison (O(K^3)
Python work). Here every prefix's KC comes from one K x K similarity matrix and a cumulative
sum, so one call is a handful of kernels with no ``.item()``: it runs on any device, in any
dtype, and ranks never need to talk to agree (the same inputs give the same decision).

The paper states the objective as ``TS + lambda * KC`` (TS: mean target similarity of the
group), solved greedily along the ranking; ``kc_weight=lambda`` selects that variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GroupDecision", "similarity", "group_scores", "prefix_decision", "select_group"]


class GroupDecision(NamedTuple):
    """Everything one grouping decision looked at; all tensors, so nothing syncs with the host."""

    mask: Tensor  # [K] bool, in the sources' original order
    target_sim: Tensor  # [K] s_k, similarity of each source to the target
    order: Tensor  # [K] long, sources ranked by s_k descending (stable)
    num_candidates: Tensor  # [] long, sources with s_k >= threshold
    kc: Tensor  # [K] KC of the ranked prefix of size m at index m-1 (0 for m = 1)
    group_size: Tensor  # [] long


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """``mean_d(mean_r(a) * mean_r(b))`` for task vectors ``[..., r, d]``: a dot product of
    token-mean vectors divided by d (the paper omits the 1/d; the ranking is the same).
    Not a cosine: longer task vectors count for more."""
    return (a.mean(dim=-2) * b.mean(dim=-2)).mean(dim=-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Prefix sums of similarities in bf16/fp16 would round away the differences that decide
    # the group, so decide in at least fp32 (fp64 stays fp64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_shapes(target_tv: Tensor, source_tvs: Tensor, max_group_size: int | None) -> None:
    if target_tv.dim() != 2:
        raise ValueError(f"target task vector must be [r, d], got shape {tuple(target_tv.shape)}")
    if source_tvs.dim() != 3 or source_tvs.shape[1:] != target_tv.shape:
        raise ValueError(
            f"source task vectors must be [K, r, d] = [K, {target_tv.shape[0]}, {target_tv.shape[1]}] "
            f"to match the target, got shape {tuple(source_tvs.shape)}"
        )
    if max_group_size is not None and max_group_size < 1:
        raise ValueError(f"max_group_size must be >= 1 or None, got {max_group_size}")


def group_scores(
    target_tv: Tensor,
    source_tvs: Tensor,
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
) -> GroupDecision:
    """Take one grouping decision and return it with the similarities and KC behind it.

    ``target_tv`` [r, d] and ``source_tvs`` [K, r, d] are the already scaled task vectors
    (``a_t * T_t`` and ``a_k * T_k``); the caller detaches them.
    """
    check_shapes(target_tv, source_tvs, max_group_size)
    dtype = compute_dtype(source_tvs.dtype)

    # 1) token means, then every similarity at once: s_k and the K x K source matrix.
    target_mean = target_tv.to(dtype).mean(dim=0)  # [d]
    source_means = source_tvs.to(dtype).mean(dim=1)  # [K, d]
    dim = target_mean.shape[-1]
    target_sim = source_means @ target_mean / dim  # [K]
    pair_sim = source_means @ source_means.T / dim  # [K, K]

    return prefix_decision(target_sim, pair_sim, threshold, kc_weight, max_group_size)


def prefix_decision(
    target_sim: Tensor,
    pair_sim: Tensor,
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
) -> GroupDecision:
    """The group along the ranking, from any similarities: ``target_sim`` [K] (each source to
    the target) and ``pair_sim`` [K, K] (source to source). ``group_scores`` feeds it the paper's
    similarity; ``dtvg_scale.variants`` feeds it others."""
    dtype, device, num_sources = target_sim.dtype, target_sim.device, target_sim.shape[0]

    # 2) rank (stable, so ties keep the sources' order) and count candidates; the candidates
    #    are exactly the first `num_candidates` of the ranking.
    order = torch.sort(target_sim, descending=True, stable=True).indices
    ranked_sim = target_sim[order]
    num_candidates = (target_sim >= threshold).sum()

    # 3) KC of every ranked prefix. Going from m-1 to m sources adds the ordered pairs between
    #    the new source and the ones before it: row m-1 left of the diagonal and column m-1
    #    above it (the matrix is symmetric up to rounding; summing both keeps it exact).
    ranked_pairs = pair_sim[order][:, order]
    strictly_lower = torch.ones(num_sources, num_sources, dtype=torch.bool, device=device).tril(-1)
    added = (ranked_pairs * strictly_lower).sum(dim=1) + (ranked_pairs * strictly_lower.T).sum(dim=0)
    pair_sums = added.cumsum(dim=0)  # [K], sum over ordered pairs of the first m
    sizes = torch.arange(1, num_sources + 1, device=device)
    num_pairs = (sizes * (sizes - 1)).clamp(min=1).to(dtype)
    kc = torch.where(sizes > 1, pair_sums / num_pairs, torch.zeros_like(pair_sums))

    # 4) the objective over prefixes: KC alone (the code) or TS + lambda * KC (the paper).
    if kc_weight is None:
        objective = kc
    else:
        mean_target_sim = ranked_sim.cumsum(dim=0) / sizes.to(dtype)
        objective = mean_target_sim + kc_weight * kc
    allowed = sizes <= num_candidates
    if max_group_size is not None:
        allowed = allowed & (sizes <= max_group_size)
    objective = torch.where(allowed, objective, torch.full_like(objective, -torch.inf))

    # 5) first maximum; argmax over all -inf (no candidate) would say m = 1, so mask it out.
    best_size = (objective.argmax() + 1) if num_sources > 0 else torch.zeros((), dtype=torch.long, device=device)
    group_size = torch.where(num_candidates > 0, best_size, torch.zeros_like(best_size))
    in_group_ranked = sizes <= group_size
    mask = torch.zeros(num_sources, dtype=torch.bool, device=device).scatter(0, order, in_group_ranked)
    return GroupDecision(mask, target_sim, order, num_candidates, kc, group_size)


def select_group(
    target_tv: Tensor,
    source_tvs: Tensor,
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
) -> Tensor:
    """The sources DTVG merges this step, as a bool mask [K] in the sources' order.

    Defaults reproduce the authors' code exactly: candidates with similarity >= ``threshold``,
    ranked; the group is the ranked prefix with the highest knowledge consistency (first
    maximum; KC of one source is 0); empty when there is no candidate. ``kc_weight`` switches
    to the paper's ``TS + kc_weight * KC``; ``max_group_size`` caps the prefix.
    """
    return group_scores(target_tv, source_tvs, threshold, kc_weight, max_group_size).mask
