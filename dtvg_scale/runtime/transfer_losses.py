"""The target's loss under prompts, measured on the sharded backbone: what ``stage2.ranking=transfer``
ranks the sources by (``dtvg_scale.method.transfer``: ``gain_k = L(P_init) - L(P_init + T_k)``).
It costs K + 1 forward passes over (at most ``stage2.transfer_examples``) target training
examples, and no source data."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dtvg_scale.data.encoding import EncodedExample, collate_train
from dtvg_scale.runtime.backbone import PromptedModel
from dtvg_scale.runtime.sampling import eval_shard


@torch.no_grad()
def target_losses(model: PromptedModel, prompts: Tensor, examples: list[EncodedExample], pad_id: int,
                  batch_size: int, rank: int, world_size: int) -> Tensor:
    """The mean label-token loss of the target's ``examples`` under each of ``prompts``
    [P, r, d] -> [P] (float32), the same on every rank.

    Every rank scores its shard of the examples with the same number of batches (padding
    repeats are weighted 0; a ZeRO-3 forward is a collective) and one all-reduce sums the
    losses and token counts. Runs in eval mode (no dropout), so it is deterministic."""
    if not examples:
        raise ValueError("the transfer ranking needs target training examples, and there are none")
    indices, valid = eval_shard(len(examples), rank, world_size)
    device = prompts.device
    totals = torch.zeros(prompts.shape[0], 2, dtype=torch.float64, device=device)  # [loss sum, tokens]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            weight = torch.tensor(valid[start:start + batch_size], dtype=torch.float64, device=device)
            batch = {k: v.to(device) for k, v in
                     collate_train([examples[i] for i in chunk], pad_id, model.is_encoder_decoder).items()}
            for p, prompt in enumerate(prompts):
                loss_sum, tokens = model.example_losses(prompt, **batch)
                totals[p, 0] += (loss_sum.double() * weight).sum()
                totals[p, 1] += (tokens.double() * weight).sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[:, 0] / totals[:, 1]).float()
