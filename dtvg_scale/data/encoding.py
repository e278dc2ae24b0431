"""Text-to-text examples as token ids, and batches of them padded per family (encoder-decoder or
decoder-only). Which examples go into which step's batch is ``dtvg_scale.runtime.sampling``'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EncodedExample:
    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # ends with eos
    target_text: str


def encode_examples(
    examples: Sequence,  # objects with .source and .target strings
    tokenizer: PreTrainedTokenizerBase,
    is_encoder_decoder: bool,
    max_source_length: int,
    max_target_length: int,
) -> list[EncodedExample]:
    """Tokenise once. T5: the tokenizer appends eos to both sides; an over-long input is cut at the
    end (as the prior code does). Decoder-only: the input keeps the tokenizer's bos and, when
    over-long, its end (where the answer cue is); the target is encoded bare and closed with eos,
    so the model learns to stop."""
    if not examples:  # a source's test split (never read); fast tokenizers refuse an empty batch
        return []
    sources = [e.source for e in examples]
    targets = [e.target for e in examples]
    if is_encoder_decoder:
        source_ids = tokenizer(sources, truncation=True, max_length=max_source_length)["input_ids"]
    else:
        # a causal LM answers right after the input's last tokens (the task's cue, " Label : "), so an
        # over-long input loses its beginning, never its end; a leading bos stays
        source_ids = [keep_end(ids, max_source_length, tokenizer.bos_token_id)
                      for ids in tokenizer(sources, verbose=False)["input_ids"]]
    target_ids = encode_targets(targets, tokenizer, is_encoder_decoder, max_target_length)
    return [EncodedExample(tuple(s), t, text) for s, t, text in zip(source_ids, target_ids, targets)]


def keep_end(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """The last ``max_length`` tokens of ``ids`` (a leading bos kept in the first place)."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def encode_targets(targets: Sequence[str], tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool,
                   max_target_length: int) -> list[tuple[int, ...]]:
    """Target strings as the training loss sees them (closed with eos)."""
    if is_encoder_decoder:
        return [tuple(ids) for ids in tokenizer(list(targets), truncation=True, max_length=max_target_length)["input_ids"]]
    bare = tokenizer(list(targets), add_special_tokens=False, truncation=True, max_length=max_target_length - 1)
    return [tuple(ids) + (tokenizer.eos_token_id,) for ids in bare["input_ids"]]


def _pad(rows: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate_train(batch: list[EncodedExample], pad_id: int, is_encoder_decoder: bool) -> dict[str, Tensor]:
    if is_encoder_decoder:
        input_rows = [list(e.source_ids) for e in batch]
        label_rows = [list(e.target_ids) for e in batch]
    else:  # one sequence: input then target, loss on the target only
        input_rows = [list(e.source_ids + e.target_ids) for e in batch]
        label_rows = [[-100] * len(e.source_ids) + list(e.target_ids) for e in batch]
    input_ids = _pad(input_rows, pad_id)
    attention_mask = _pad([[1] * len(r) for r in input_rows], 0)
    labels = _pad(label_rows, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_inputs(batch: list[EncodedExample], pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """Inputs only, padded on the right unless ``left``."""
    rows = [list(e.source_ids) for e in batch]
    return {
        "input_ids": _pad(rows, pad_id, left=left),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=left),
    }


def collate_generate(batch: list[EncodedExample], pad_id: int, is_encoder_decoder: bool) -> dict[str, Tensor]:
    """Inputs only; decoder-only models generate after the last input token, so pad left."""
    return collate_inputs(batch, pad_id, left=not is_encoder_decoder)
