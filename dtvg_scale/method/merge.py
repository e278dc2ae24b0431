"""The DTVG merge (the paper's Eq. for P_mix) and the starting scales, as pure tensor code.

``merge_prompt`` is the paper's sum; ``merge`` adds the ``mean`` and ``softmax`` variants
(``MERGES``, knob ``stage2.merge``) on top of it; ``init_scales`` the starting per-token scales
(``SCALE_INITS``, knob ``stage2.scale_init``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtvg_scale.method.similarities import compute_dtype

MERGES: tuple[str, ...] = ("sum", "mean", "softmax")
SCALE_INITS: tuple[str, ...] = ("ones", "uniform", "zeros", "constant")


def merge_prompt(
    init_prompt: Tensor,
    target_tv: Tensor,
    target_scale: Tensor,
    source_tvs: Tensor,
    source_scales: Tensor,
    mask: Tensor,
) -> Tensor:
    """``P_mix = P_init + a_t * T_t + sum_k mask_k * a_k * T_k`` with per-token scales.

    Shapes: ``init_prompt``/``target_tv`` [r, d], ``target_scale`` [r], ``source_tvs`` [K, r, d],
    ``source_scales`` [K, r], ``mask`` [K] bool. The mask multiplies the scales, so a source
    outside the group contributes nothing and its scales get an exact zero gradient.
    """
    weights = source_scales * mask.to(source_scales.dtype).unsqueeze(-1)  # [K, r]
    merged_sources = torch.einsum("kr,krd->rd", weights, source_tvs.to(weights.dtype))
    return init_prompt + target_scale.unsqueeze(-1) * target_tv + merged_sources


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

    - ``sum``: ``w_k = 1`` (the paper; this is ``merge_prompt``).
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
