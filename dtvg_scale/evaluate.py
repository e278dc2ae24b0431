"""Generation-based evaluation: greedy decoding with a frozen prompt, exact string match.

Every rank evaluates its shard of the examples with the same number of batches (padded with
repeats that are not counted), and the counts are summed over ranks, so the score is that of
the whole split whatever the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dtvg_scale.backbone import PromptedModel
from dtvg_scale.data import EncodedExample, collate_generate, eval_shard


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


@torch.no_grad()
def evaluate(
    model: PromptedModel,
    prompt_rows: Tensor,
    examples: list[EncodedExample],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    rank: int,
    world_size: int,
    synced: bool,
) -> dict[str, float]:
    """Accuracy (exact match) of greedy generations over ``examples``, the same on all ranks."""
    indices, valid = eval_shard(len(examples), rank, world_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for start in range(0, len(indices), batch_size):
            batch = [examples[i] for i in indices[start:start + batch_size]]
            inputs = collate_generate(batch, tokenizer.pad_token_id, model.is_encoder_decoder)
            device = prompt_rows.device
            generated = model.generate(
                prompt_rows,
                inputs["input_ids"].to(device),
                inputs["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                synced=synced,
            )
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for text, example, counted in zip(texts, batch, valid[start:start + batch_size]):
                if counted:
                    total += 1
                    correct += exact_match(text, example.target_text)
    finally:
        model.train(was_training)
    counts = torch.tensor([correct, total], dtype=torch.float64, device=prompt_rows.device)
    if world_size > 1:
        dist.all_reduce(counts)
    return {"accuracy": float(counts[0] / counts[1].clamp(min=1)), "examples": int(counts[1])}
