"""The DTVG merge as one pure tensor function (the paper's Eq. for P_mix).

Kept apart from the prompt modules so that the merge variants (``dtvg_scale.variants``) and
the Stage-II prompt (``dtvg_scale.prompts``) build on the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
