"""Soft prompts: the plain prompt of Stage I and the merged DTVG prompt of Stage II.

Both are small ``nn.Module``s whose ``forward()`` returns the prompt rows [r, d] to prepend to
the backbone's input embeddings, plus (Stage II) the grouping decision taken for them. They hold
every trainable tensor of a run; the backbone stays frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dtvg_scale.method import merge as merging
from dtvg_scale.method.config import DTVGConfig
from dtvg_scale.method.selection import GroupDecision, decide
from dtvg_scale.method.similarities import POOLED_SIMILARITIES, scaled_token_means
from dtvg_scale.method.strategies import strategy_mask

__all__ = ["DTVGPrompt", "SoftPrompt", "sample_init_prompt"]


def sample_init_prompt(embedding_weight: Tensor, length: int, vocab_limit: int = 5000, seed: int = 42) -> Tensor:
    """P_init: ``length`` rows of the (whole, gathered) input embedding table, drawn without
    replacement from the first ``vocab_limit`` ids with a fixed seed, so every task that uses
    the same backbone and seed starts from the same P_init."""
    available = min(vocab_limit, embedding_weight.shape[0])
    if length > available:
        raise ValueError(f"prompt length {length} exceeds the {available} embedding rows it is drawn from")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(available, generator=generator)[:length]
    return embedding_weight[ids.to(embedding_weight.device)].detach().clone()


class SoftPrompt(nn.Module):
    """A plain trainable prompt (Stage I, and the SPoT baseline)."""

    def __init__(self, init_prompt: Tensor, start: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("init_prompt", init_prompt.detach().clone(), persistent=False)
        self.prompt = nn.Parameter((init_prompt if start is None else start).detach().clone())

    def forward(self) -> tuple[Tensor, GroupDecision | None]:
        return self.prompt, None


class DTVGPrompt(nn.Module):
    """Stage II: the target prompt, the per-token scales and the frozen source task vectors.

    Its knobs are a ``DTVGConfig`` (method/config.py). Trainable: ``prompt`` (P_t, starts at the
    target's Stage-I prompt), ``target_scale`` [r] and ``source_scales`` [K, r] (``scale_init``).
    Buffers: ``init_prompt`` and ``source_tvs`` (inputs, not state: non-persistent, so checkpoints
    hold only what trains), and the ``fixed_group`` strategy's first decision (persistent, so a
    resumed run keeps it).
    """

    def __init__(self, init_prompt: Tensor, target_prompt: Tensor, source_tvs: Tensor,
                 config: DTVGConfig = DTVGConfig()) -> None:
        super().__init__()
        if target_prompt.shape != init_prompt.shape or source_tvs.shape[1:] != init_prompt.shape:
            raise ValueError(
                f"shape mismatch: P_init {tuple(init_prompt.shape)}, target prompt {tuple(target_prompt.shape)}, "
                f"source task vectors {tuple(source_tvs.shape)} (expected [K, {', '.join(map(str, init_prompt.shape))}])"
            )
        num_sources, length = source_tvs.shape[0], init_prompt.shape[0]
        self.config = config  # validated when it was made
        self.register_buffer("init_prompt", init_prompt.detach().clone(), persistent=False)
        self.register_buffer("source_tvs", source_tvs.detach().clone(), persistent=False)
        self.register_buffer("fixed_mask", torch.zeros(num_sources, dtype=torch.bool))
        self.register_buffer("fixed_decided", torch.zeros((), dtype=torch.bool))
        # ranking="transfer": the sources' transfer gains, measured once before training
        # (set_transfer_gain); persistent, so a resumed run ranks with the values it started with
        self.register_buffer("transfer_gain", torch.zeros(num_sources, dtype=torch.float32))
        self.transfer_measured = False
        self.prompt = nn.Parameter(target_prompt.detach().clone())
        target_scale, source_scales = merging.init_scales(num_sources, length, config.scale_init,
                                                          dtype=init_prompt.dtype, value=config.scale_value)
        self.target_scale = nn.Parameter(target_scale)
        self.source_scales = nn.Parameter(source_scales)

    def transfer_prompts(self) -> Tensor:
        """``[P_init; P_init + T_1; ...; P_init + T_K]`` [K + 1, r, d]: the prompts whose target loss
        the transfer gains compare (``dtvg_scale.method.transfer``)."""
        return torch.cat([self.init_prompt.unsqueeze(0), self.init_prompt + self.source_tvs])

    def set_transfer_gain(self, gain: Tensor) -> None:
        """The sources' transfer gains [K] (``dtvg_scale.method.transfer``), for ranking="transfer"."""
        if gain.shape != self.transfer_gain.shape:
            raise ValueError(f"transfer gain has shape {tuple(gain.shape)}, expected {tuple(self.transfer_gain.shape)}")
        self.transfer_gain.copy_(gain)
        self.transfer_measured = True

    def decide(self) -> tuple[Tensor, GroupDecision]:
        """The grouping decision, on detached scaled vectors; updates fixed_group's state."""
        ranked_by = None
        if self.config.ranking == "transfer":
            if not self.transfer_measured:
                raise RuntimeError("ranking='transfer' needs set_transfer_gain() before the first step")
            ranked_by = self.transfer_gain
        with torch.no_grad():
            target_tv = self.prompt - self.init_prompt
            if self.config.similarity in POOLED_SIMILARITIES:  # token means only: one pass over the sources
                scaled_target = scaled_token_means(self.target_scale, target_tv)
                scaled_sources = scaled_token_means(self.source_scales, self.source_tvs)
            else:
                scaled_target = self.target_scale.unsqueeze(-1) * target_tv
                scaled_sources = self.source_scales.unsqueeze(-1) * self.source_tvs
            c = self.config
            decision = decide(scaled_target, scaled_sources, c.similarity, c.selection, c.threshold, c.kc_weight,
                              c.max_group_size, c.top_k, target_sim=ranked_by)
            mask, fixed_mask, fixed_decided = strategy_mask(c.strategy, decision, c.threshold, self.fixed_mask,
                                                            self.fixed_decided)
            if c.strategy == "fixed_group" and self.training:
                self.fixed_mask.copy_(fixed_mask)
                self.fixed_decided.copy_(fixed_decided)
        return mask, decision._replace(mask=mask, group_size=mask.sum())

    def scale_norms(self) -> tuple[Tensor, Tensor]:
        """The norm of the target's scales [] and of each source's [K]: what a tracker follows."""
        return self.target_scale.detach().float().norm(), self.source_scales.detach().float().norm(dim=-1)

    def forward(self) -> tuple[Tensor, GroupDecision]:
        mask, decision = self.decide()
        merged = merging.merge(
            self.init_prompt, self.prompt - self.init_prompt, self.target_scale, self.source_tvs, self.source_scales,
            mask, self.config.merge, target_sim=decision.target_sim, temperature=self.config.temperature,
        )
        return merged, decision
