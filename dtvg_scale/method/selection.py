"""Which sources join the group: the DTVG rule as pure tensor code, and its variants.

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

``decide`` takes any similarity of ``similarities.py`` and a selection rule (``SELECTIONS``):
``greedy_prefix`` (the paper's code, above), ``exact`` (the true maximiser of TS + lambda*KC over
all subsets, K <= 16) and ``top_k``; ``group_scores`` is the paper's decision (``mean_dot``,
``greedy_prefix``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from dtvg_scale.method.similarities import SIMILARITIES, check_vectors, mean_dot

EXACT_MAX_SOURCES = 16  # "exact" enumerates 2^K subsets
SELECTIONS: tuple[str, ...] = ("greedy_prefix", "exact", "top_k")


class GroupDecision(NamedTuple):
    """Everything one grouping decision looked at; all tensors, so nothing syncs with the host."""

    mask: Tensor  # [K] bool, in the sources' original order
    target_sim: Tensor  # [K] s_k, similarity of each source to the target
    order: Tensor  # [K] long, sources ranked by s_k descending (stable)
    num_candidates: Tensor  # [] long, sources with s_k >= threshold
    kc: Tensor  # [K] KC of the ranked prefix of size m at index m-1 (0 for m = 1)
    group_size: Tensor  # [] long


def check_group_size(max_group_size: int | None) -> None:
    if max_group_size is not None and max_group_size < 1:
        raise ValueError(f"max_group_size must be >= 1 or None, got {max_group_size}")


def group_scores(
    target_tv: Tensor,
    source_tvs: Tensor,
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
) -> GroupDecision:
    """The paper's decision (``mean_dot``, ``greedy_prefix``) with the similarities and KC behind it.

    ``target_tv`` [r, d] and ``source_tvs`` [K, r, d] are the already scaled task vectors
    (``a_t * T_t`` and ``a_k * T_k``); the caller detaches them.
    """
    check_vectors(target_tv, source_tvs)
    check_group_size(max_group_size)
    return prefix_decision(*mean_dot(target_tv, source_tvs), threshold, kc_weight, max_group_size)


def prefix_decision(
    target_sim: Tensor,
    pair_sim: Tensor,
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
) -> GroupDecision:
    """The group along the ranking, from any similarities: ``target_sim`` [K] (each source to
    the target) and ``pair_sim`` [K, K] (source to source). ``group_scores`` feeds it the paper's
    similarity; ``decide`` feeds it any other."""
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


# -- any similarity, any selection
def group_objective(masks: Tensor, target_sim: Tensor, pair_sim: Tensor, kc_weight: float | None = 1.0) -> Tensor:
    """The objective of arbitrary groups: ``TS + kc_weight * KC`` (``kc_weight=None``: KC alone,
    the code's criterion), for ``masks`` [..., K] bool; returns [...].

    TS = mean target similarity of the group; KC = mean ``pair_sim`` over its ordered pairs
    ``i != j`` (0 for a group of one). An empty group scores ``-inf``.
    """
    weights = masks.to(target_sim.dtype)
    sizes = weights.sum(dim=-1)
    off_diagonal = pair_sim.masked_fill(torch.eye(pair_sim.shape[0], dtype=torch.bool, device=pair_sim.device), 0)
    pair_sums = ((weights @ off_diagonal) * weights).sum(dim=-1)
    kc = torch.where(sizes > 1, pair_sums / (sizes * (sizes - 1)).clamp(min=1), torch.zeros_like(sizes))
    if kc_weight is None:
        objective = kc
    else:
        objective = (weights @ target_sim) / sizes.clamp(min=1) + kc_weight * kc
    return torch.where(sizes > 0, objective, torch.full_like(objective, -torch.inf))


@functools.lru_cache(maxsize=32)
def _subset_table(num_sources: int, device: torch.device) -> Tensor:
    """Every non-empty subset of ``num_sources`` ranked sources as a ``[2^K - 1, K]`` bool
    matrix (column j = the j-th ranked source), rows in tie-break order: smallest size first,
    then lexicographic by the sorted ranked indices ({0, 1} < {0, 2} < {1, 2})."""
    with torch.inference_mode(False), torch.no_grad():  # cached: must be a plain tensor
        codes = torch.arange(1, 2**num_sources, device=device)
        bits = torch.arange(num_sources, device=device)
        table = ((codes.unsqueeze(-1) >> bits) & 1).bool()  # [2^K - 1, K]
        # Within one size, lexicographic order of the index lists is descending order of the
        # code that reads bit 0 as its most significant bit (keys are unique).
        msb_first = (table.long() << (num_sources - 1 - bits)).sum(dim=-1)
        key = table.sum(dim=-1) * (2**num_sources) - msb_first
        return table[torch.argsort(key)]


def _exact_decision(
    decision: GroupDecision,
    pair_sim: Tensor,
    kc_weight: float,
    max_group_size: int | None,
) -> Tensor:
    """Mask of the exact maximiser of TS + kc_weight * KC over all non-empty groups of
    candidates (size <= max_group_size), first in ``_subset_table`` order among ties."""
    num_sources = decision.target_sim.shape[0]
    device = decision.target_sim.device
    if num_sources == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    order = decision.order
    table = _subset_table(num_sources, device)  # ranked coordinates
    ranks = torch.arange(num_sources, device=device)
    not_candidate = ranks >= decision.num_candidates  # candidates are the ranked prefix
    valid = ~(table & not_candidate).any(dim=-1)
    if max_group_size is not None:
        valid = valid & (table.sum(dim=-1) <= max_group_size)
    objective = group_objective(table, decision.target_sim[order], pair_sim[order][:, order], kc_weight)
    objective = torch.where(valid, objective, torch.full_like(objective, -torch.inf))
    best = torch.index_select(table, 0, objective.argmax().view(1)).squeeze(0)
    best = best & valid.any()  # no candidate: empty group
    return torch.zeros(num_sources, dtype=torch.bool, device=device).scatter(0, order, best)


def decide(
    target_tv: Tensor,
    source_tvs: Tensor,
    similarity: str = "mean_dot",
    selection: str = "greedy_prefix",
    threshold: float = 0.0,
    kc_weight: float | None = None,
    max_group_size: int | None = None,
    top_k: int | None = None,
    target_sim: Tensor | None = None,
) -> GroupDecision:
    """One grouping decision with any similarity and selection rule.

    ``target_tv`` [r, d] and ``source_tvs`` [K, r, d] are the scaled task vectors (``a_t*T_t``,
    ``a_k*T_k``); the caller detaches them. Candidates are always the sources with
    ``target_sim >= threshold`` (inclusive), ranked by ``target_sim`` descending (stable: ties
    keep the sources' order). Selections:

    - ``greedy_prefix``: the paper's rule (``group_scores``): the ranked prefix of candidates with
      the best KC (``kc_weight=None``, the code) or TS + kc_weight*KC (the paper), first
      maximum, at most ``max_group_size``. With ``similarity="mean_dot"`` the result equals
      ``group_scores`` field for field.
    - ``exact``: the maximiser of TS + lambda*KC over ALL non-empty subsets of the candidates of
      size <= ``max_group_size``, with ``lambda = kc_weight`` (1.0 when None: KC alone would
      ignore the target). KC of one source is 0. Ties go to the smallest group, then to the
      lexicographically first list of ranked indices. Enumerates 2^K subsets: ValueError if
      K > 16 (K = number of sources, a static shape, not of candidates).
    - ``top_k``: the ``top_k`` (>= 1) best-ranked candidates (fewer if fewer candidates), at
      most ``max_group_size``; ``kc_weight`` is ignored.

    ``target_sim`` [K], if given, replaces the similarity's source-to-target scores: it ranks
    and thresholds the sources (``stage2.ranking=transfer`` passes the function-space transfer
    gains of ``dtvg_scale.method.transfer``), while KC still compares the task vectors with
    ``similarity``.

    The returned ``GroupDecision`` always holds the ``target_sim`` used, the ranking, the number
    of candidates and the KC curve of the ranked prefixes (a diagnostic, whatever the
    selection); ``mask`` and ``group_size`` are the selection's.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
    check_vectors(target_tv, source_tvs)
    check_group_size(max_group_size)
    num_sources = source_tvs.shape[0]
    if selection == "exact" and num_sources > EXACT_MAX_SOURCES:
        raise ValueError(f"selection 'exact' enumerates 2^K subsets; K = {num_sources} > {EXACT_MAX_SOURCES}")
    if selection == "top_k" and (top_k is None or top_k < 1):
        raise ValueError(f"selection 'top_k' needs top_k >= 1, got {top_k}")

    vector_sim, pair_sim = SIMILARITIES[similarity](target_tv, source_tvs)
    if target_sim is None:
        target_sim = vector_sim
    elif target_sim.shape != vector_sim.shape:
        raise ValueError(f"target_sim has shape {tuple(target_sim.shape)}, expected {tuple(vector_sim.shape)}")
    else:
        target_sim = target_sim.to(vector_sim.dtype)
    prefix_kc_weight = kc_weight if selection == "greedy_prefix" else None
    decision = prefix_decision(target_sim, pair_sim, threshold, prefix_kc_weight, max_group_size)
    if selection == "greedy_prefix":
        return decision

    if selection == "exact":
        mask = _exact_decision(decision, pair_sim, 1.0 if kc_weight is None else kc_weight, max_group_size)
    else:  # top_k
        limit = top_k if max_group_size is None else min(top_k, max_group_size)
        ranks = torch.arange(num_sources, device=target_sim.device)
        in_group_ranked = (ranks < decision.num_candidates) & (ranks < limit)
        mask = torch.zeros_like(in_group_ranked).scatter(0, decision.order, in_group_ranked)
    return decision._replace(mask=mask, group_size=mask.sum())
