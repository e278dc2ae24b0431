"""Variants of DTVG's Stage II: other similarities, selection rules, merges and scale inits.

The paper's rule (``grouping.py``) compares task vectors with a dot product of token means. In
the controlled experiment (``/work/shared/research/controlled_findings.md``) that similarity was
dominated by a component shared by every task: almost every source scored positive, KC was flat
and the planted helpful sources were rarely ranked first. This module makes each part of the
decision a knob so a sweep can search it, while the defaults reproduce the paper's code exactly:

- similarity (``SIMILARITIES``): ``mean_dot`` (paper), ``mean_cosine``, ``flat_dot``,
  ``flat_cosine``, ``centered_sources``, ``centered_all``, ``token_cosine``;
- selection (``decide``): ``greedy_prefix`` (paper/code), ``exact`` (true maximiser of
  TS + lambda*KC over all subsets, K <= 16), ``top_k``;
- merge (``merge``): ``sum`` (paper), ``mean``, ``softmax``;
- scale init (``init_scales``): ``ones`` (paper), ``uniform``, ``zeros``, ``constant``.

Everything is pure tensor code: no I/O, no Python loop over sources or pairs, no host sync
(no ``.item()``, no tensor-valued ``if``); every branch depends only on Python arguments and
static shapes, so all ranks take the same path. Similarities and decisions are computed in at
least float32 (float64 stays float64), whatever the input dtype.

Every similarity is an inner product of a feature map of the task vectors, so ``pair_sim`` is a
symmetric positive semi-definite Gram matrix:

- ``mean_dot``: ``mean_d(mean_r(a) * mean_r(b))`` (= ``grouping.similarity``; the paper).
- ``mean_cosine``: cosine of the token means ``mean_r(a)`` and ``mean_r(b)``.
- ``flat_dot``: ``sum(a * b) / (r * d)`` over all entries (no mean-pooling).
- ``flat_cosine``: cosine of the flattened ``[r * d]`` vectors.
- ``centered_sources``: ``mean_cosine`` after ``center(..., include_target=False)``, i.e.
  after subtracting the mean of the K source task vectors from the target and every source.
- ``centered_all``: ``mean_cosine`` after ``center(..., include_target=True)``, i.e. after
  subtracting the mean of the K sources and the target (K + 1 vectors) from all of them.
- ``token_cosine``: ``mean_r cos(a[i], b[i])``: row-wise cosine, averaged over the r tokens.

A cosine with a zero vector (norm below ``EPS``) is 0, never NaN. Centering removes any
component shared by all the vectors it averages: adding the same vector to the target and to
every source changes neither centered similarity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dtvg_scale.grouping import GroupDecision, check_shapes, compute_dtype, prefix_decision
from dtvg_scale.merge import merge_prompt

__all__ = [
    "EPS",
    "EXACT_MAX_SOURCES",
    "MERGES",
    "SCALE_INITS",
    "SELECTIONS",
    "SIMILARITIES",
    "VARIANT_DEFAULTS",
    "VARIANT_KNOBS",
    "POOLED_SIMILARITIES",
    "PRESETS",
    "center",
    "centered_all",
    "centered_sources",
    "decide",
    "flat_cosine",
    "flat_dot",
    "group_objective",
    "init_scales",
    "mean_cosine",
    "mean_dot",
    "merge",
    "scaled_token_means",
    "token_cosine",
]

EPS = 1e-12  # norms below this count as zero: the cosine with a zero vector is 0
EXACT_MAX_SOURCES = 16  # "exact" enumerates 2^K subsets

SimilarityFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


# --------------------------------------------------------------------------------------------
# similarities: fn(target_tv [r, d], source_tvs [K, r, d]) -> (target_sim [K], pair_sim [K, K])
# --------------------------------------------------------------------------------------------
def _prepare(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    check_shapes(target_tv, source_tvs, None)
    dtype = compute_dtype(source_tvs.dtype)
    return target_tv.to(dtype), source_tvs.to(dtype)


def _dot_gram(target_feat: Tensor, source_feats: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Inner products of features ``[D]`` / ``[K, D]``, divided by ``scale``."""
    return source_feats @ target_feat / scale, source_feats @ source_feats.T / scale


def _cosine_gram(target_feat: Tensor, source_feats: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines of features ``[D]`` / ``[K, D]``; a zero feature vector has cosine 0 with all."""
    target_unit = F.normalize(target_feat, dim=-1, eps=EPS)
    source_units = F.normalize(source_feats, dim=-1, eps=EPS)
    return source_units @ target_unit, source_units @ source_units.T


def mean_dot(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's similarity, ``mean_d(mean_r(a) * mean_r(b))``, computed exactly as
    ``grouping.group_scores`` does (so decisions match it bit for bit)."""
    target, sources = _prepare(target_tv, source_tvs)
    return _dot_gram(target.mean(dim=0), sources.mean(dim=1), target.shape[-1])


def mean_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of the token-mean vectors ``mean_r(a)`` and ``mean_r(b)``."""
    target, sources = _prepare(target_tv, source_tvs)
    return _cosine_gram(target.mean(dim=0), sources.mean(dim=1))


def flat_dot(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Dot product over all ``r * d`` entries, divided by ``r * d`` (no mean-pooling)."""
    target, sources = _prepare(target_tv, source_tvs)
    return _dot_gram(target.flatten(), sources.flatten(start_dim=1), target.numel())


def flat_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of the flattened ``[r * d]`` vectors."""
    target, sources = _prepare(target_tv, source_tvs)
    return _cosine_gram(target.flatten(), sources.flatten(start_dim=1))


def center(target_tv: Tensor, source_tvs: Tensor, include_target: bool) -> tuple[Tensor, Tensor]:
    """Subtract one mean task vector ``mu`` [r, d] from the target and from every source.

    ``include_target=False``: ``mu = mean_k T_k`` over the K sources (the library);
    ``include_target=True``: ``mu = (T_t + sum_k T_k) / (K + 1)``.
    With no source and ``include_target=False``, ``mu = 0``. Returns the centered
    ``(target [r, d], sources [K, r, d])`` in the compute dtype (>= float32).
    """
    target, sources = _prepare(target_tv, source_tvs)
    total = sources.sum(dim=0)
    count = sources.shape[0]
    if include_target:
        total = total + target
        count += 1
    mu = total / max(count, 1)
    return target - mu, sources - mu


def centered_sources(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_cosine`` after subtracting the mean of the K source task vectors from all."""
    return mean_cosine(*center(target_tv, source_tvs, include_target=False))


def centered_all(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_cosine`` after subtracting the mean of the K sources and the target from all."""
    return mean_cosine(*center(target_tv, source_tvs, include_target=True))


def token_cosine(target_tv: Tensor, source_tvs: Tensor) -> tuple[Tensor, Tensor]:
    """``mean_r cos(a[i, :], b[i, :])``: the row-wise cosine of the two prompts, averaged over
    the r tokens (a zero row contributes 0). One matmul over unit rows, flattened."""
    target, sources = _prepare(target_tv, source_tvs)
    length = target.shape[0]
    target_rows = F.normalize(target, dim=-1, eps=EPS).flatten()
    source_rows = F.normalize(sources, dim=-1, eps=EPS).flatten(start_dim=1)
    return _dot_gram(target_rows, source_rows, length)


SIMILARITIES: dict[str, SimilarityFn] = {
    "mean_dot": mean_dot,
    "mean_cosine": mean_cosine,
    "flat_dot": flat_dot,
    "flat_cosine": flat_cosine,
    "centered_sources": centered_sources,
    "centered_all": centered_all,
    "token_cosine": token_cosine,
}


# The similarities that see a task vector only through its token mean ``mean_r`` (centering is
# linear, so it commutes with the mean): for them ``scaled_token_means`` is an exact stand-in for
# the full scaled vectors, without materialising ``[K, r, d]`` (26 MB at K=128, r=200, d=256).
POOLED_SIMILARITIES: tuple[str, ...] = ("mean_dot", "mean_cosine", "centered_sources", "centered_all")


def scaled_token_means(scales: Tensor, vectors: Tensor) -> Tensor:
    """``mean_r(scales[..., r, None] * vectors)`` kept as one token: ``[..., 1, d]`` from scales
    ``[..., r]`` and vectors ``[..., r, d]``, in the compute dtype (>= float32). A pooled
    similarity gives (up to rounding) the same result on these as on the scaled vectors."""
    dtype = compute_dtype(vectors.dtype)
    pooled = torch.einsum("...r,...rd->...d", scales.to(dtype), vectors.to(dtype)) / vectors.shape[-2]
    return pooled.unsqueeze(-2)


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
SELECTIONS: tuple[str, ...] = ("greedy_prefix", "exact", "top_k")


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

    - ``greedy_prefix``: ``grouping.group_scores``'s rule: the ranked prefix of candidates with
      the best KC (``kc_weight=None``, the code) or TS + kc_weight*KC (the paper), first
      maximum, at most ``max_group_size``. With ``similarity="mean_dot"`` the result equals
      ``grouping.group_scores`` field for field.
    - ``exact``: the maximiser of TS + lambda*KC over ALL non-empty subsets of the candidates of
      size <= ``max_group_size``, with ``lambda = kc_weight`` (1.0 when None: KC alone would
      ignore the target). KC of one source is 0. Ties go to the smallest group, then to the
      lexicographically first list of ranked indices. Enumerates 2^K subsets: ValueError if
      K > 16 (K = number of sources, a static shape, not of candidates).
    - ``top_k``: the ``top_k`` (>= 1) best-ranked candidates (fewer if fewer candidates), at
      most ``max_group_size``; ``kc_weight`` is ignored.

    ``target_sim`` [K], if given, replaces the similarity's source-to-target scores: it ranks
    and thresholds the sources (``stage2.ranking=transfer`` passes the function-space transfer
    gains of ``dtvg_scale.transfer``), while KC still compares the task vectors with
    ``similarity``.

    The returned ``GroupDecision`` always holds the ``target_sim`` used, the ranking, the number
    of candidates and the KC curve of the ranked prefixes (a diagnostic, whatever the
    selection); ``mask`` and ``group_size`` are the selection's.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; known: {', '.join(SIMILARITIES)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
    check_shapes(target_tv, source_tvs, max_group_size)
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


# --------------------------------------------------------------------------------------------
# merge and scale init
# --------------------------------------------------------------------------------------------
MERGES: tuple[str, ...] = ("sum", "mean", "softmax")
SCALE_INITS: tuple[str, ...] = ("ones", "uniform", "zeros", "constant")


def merge(
    init_prompt: Tensor,
    target_tv: Tensor,
    target_scale: Tensor,
    source_tvs: Tensor,
    source_scales: Tensor,
    mask: Tensor,
    mode: str = "sum",
    target_sim: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """``P_mix = P_init + a_t * T_t + sum_k w_k * mask_k * a_k * T_k`` [r, d].

    - ``sum``: ``w_k = 1`` (the paper; this is ``merge.merge_prompt``).
    - ``mean``: ``w_k = 1 / n`` with ``n`` the number of selected sources (no source term when
      none is selected).
    - ``softmax``: ``w = softmax(target_sim / temperature)`` over the selected sources only
      (unselected: 0; none selected: no source term); needs ``target_sim`` [K] and
      ``temperature > 0``.

    The weights are constants (computed from the mask and a detached ``target_sim``): gradients
    reach ``target_tv``, ``target_scale`` and the selected ``source_scales`` only; unselected
    source scales get an exact zero gradient.
    """
    if mode not in MERGES:
        raise ValueError(f"unknown merge {mode!r}; known: {', '.join(MERGES)}")
    if mode == "sum":
        return merge_prompt(init_prompt, target_tv, target_scale, source_tvs, source_scales, mask)
    if mode == "mean":
        count = mask.sum().clamp(min=1).to(source_scales.dtype)
        return merge_prompt(init_prompt, target_tv, target_scale, source_tvs, source_scales / count, mask)

    if target_sim is None:
        raise ValueError("merge 'softmax' needs target_sim")
    if not temperature > 0:
        raise ValueError(f"merge 'softmax' needs temperature > 0, got {temperature}")
    weights = _masked_softmax(target_sim.detach(), mask, temperature)
    scaled = source_scales * weights.to(source_scales.dtype).unsqueeze(-1)
    return merge_prompt(init_prompt, target_tv, target_scale, source_tvs, scaled, mask)


def _masked_softmax(scores: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """softmax(scores / temperature) over ``mask`` only; 0 elsewhere; all 0 if mask is empty."""
    logits = scores.to(compute_dtype(scores.dtype)) / temperature
    if logits.shape[0] == 0:
        return logits
    peak = torch.where(mask, logits, torch.full_like(logits, -torch.inf)).max()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exps = torch.where(mask, torch.exp(torch.where(mask, logits - peak, torch.zeros_like(logits))), 0)
    return exps / exps.sum().clamp(min=torch.finfo(exps.dtype).tiny)


def init_scales(
    num_sources: int,
    length: int,
    mode: str = "ones",
    dtype: torch.dtype = torch.float32,
    value: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Starting per-token scales ``(target_scale [r], source_scales [K, r])``.

    The target scale always starts at 1, so Stage II starts from the target's Stage-I prompt.
    Source scales: ``ones`` -> 1 (the paper: a sum merge starts as the sum of the group);
    ``uniform`` -> 1/K (a sum over all sources starts as their mean); ``zeros`` -> 0 (starts as
    the target alone; the scales still get gradients ``T_k`` and can grow); ``constant`` ->
    ``value`` (required for this mode, rejected for the others).
    """
    if mode not in SCALE_INITS:
        raise ValueError(f"unknown scale init {mode!r}; known: {', '.join(SCALE_INITS)}")
    if (mode == "constant") != (value is not None):
        raise ValueError("scale init 'constant' needs value=...; the other modes take no value")
    source_value = {"ones": 1.0, "uniform": 1.0 / max(num_sources, 1), "zeros": 0.0}.get(mode, value)
    target_scale = torch.ones(length, dtype=dtype, device=device)
    source_scales = torch.full((num_sources, length), source_value, dtype=dtype, device=device)
    return target_scale, source_scales


# --------------------------------------------------------------------------------------------
# knobs for the config and the sweep
# --------------------------------------------------------------------------------------------
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
