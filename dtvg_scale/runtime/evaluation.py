"""Generation-based evaluation: greedy decoding with a frozen prompt, then the task's metrics.

Every rank generates for its shard of the examples with the same number of batches (padded with
repeats that are not counted; ZeRO-3 hangs otherwise), the predictions are gathered in the
examples' order, and every rank scores the whole split the same way: the score does not depend
on the world size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dtvg_scale.data.encoding import EncodedExample, collate_generate, collate_inputs
from dtvg_scale.runtime.backbone import PromptedModel
from dtvg_scale.runtime.sampling import eval_shard


@torch.no_grad()
def generate_predictions(
    model: PromptedModel,
    prompt_rows: Tensor,
    examples: list[EncodedExample],
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    rank: int,
    world_size: int,
    synced: bool,
) -> list[str]:
    """Greedy generations for ``examples`` (decoded, special tokens dropped), on every rank."""
    def predict(chunk: list[EncodedExample]) -> list[str]:
        inputs = collate_generate(chunk, tokenizer.pad_token_id, model.is_encoder_decoder)
        generated = model.generate(prompt_rows, inputs["input_ids"].to(prompt_rows.device),
                                   inputs["attention_mask"].to(prompt_rows.device), max_new_tokens=max_new_tokens,
                                   synced=synced)
        return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]

    return sharded_predictions(model, examples, predict, batch_size, rank, world_size)


def sharded_predictions(model: PromptedModel, examples: list[EncodedExample],
                        predict: Callable[[list[EncodedExample]], list[str]], batch_size: int, rank: int,
                        world_size: int) -> list[str]:
    """``predict`` over this rank's shard of ``examples`` in batches, in eval mode, gathered into
    the examples' order on every rank. Every rank runs the same number of batches (the shards are
    padded with repeats that are not counted), as ZeRO-3 needs."""
    indices, valid = eval_shard(len(examples), rank, world_size)
    was_training = model.training
    model.eval()
    mine: list[tuple[int, str]] = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            predictions = predict([examples[i] for i in chunk])
            mine += [(i, text) for i, text, ok in zip(chunk, predictions, valid[start:start + batch_size], strict=True)
                     if ok]
    finally:
        model.train(was_training)
    return _gather_predictions(mine, len(examples), world_size)


def _gather_predictions(mine: list[tuple[int, str]], num_examples: int, world_size: int) -> list[str]:
    """Every rank's (index, prediction) pairs, gathered into the examples' order on every rank."""
    gathered: list = [mine]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    predictions = [""] * num_examples
    for part in gathered:
        for index, text in part:
            predictions[index] = text
    return predictions


@torch.no_grad()
def likelihood_predictions(
    model: PromptedModel,
    prompt_rows: Tensor,
    examples: list[EncodedExample],
    label_ids: Sequence[tuple[int, ...]],
    labels: Sequence[str],
    pad_id: int,
    batch_size: int,
    rank: int,
    world_size: int,
) -> list[str]:
    """For each example, the label whose target tokens (as training encodes them, eos included)
    have the lowest summed cross-entropy after the input: scoring by the labels' likelihood, an
    evaluation that always yields a label (a small model may not generate one). Each input is read
    once for all its labels (``PromptedModel.label_losses``); ranks run the same number of batches
    (padded shards), as ZeRO-3 needs."""
    def predict(chunk: list[EncodedExample]) -> list[str]:
        inputs = collate_inputs(chunk, pad_id)
        device = prompt_rows.device
        losses = model.label_losses(prompt_rows, inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                                    label_ids)
        return [labels[best] for best in losses.argmin(dim=1).tolist()]

    return sharded_predictions(model, examples, predict, batch_size, rank, world_size)
