"""Deterministic batches per step and evaluation shards per rank.

The batch of optimizer step ``s`` is a pure function of (seed, s): a resumed run draws exactly
the batches the uninterrupted run would have drawn, and every rank computes the same global
batch and takes its own slice of it without talking to the others.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_examples, generator=generator).tolist())


def global_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: consecutive slices of a stream of seeded
    epoch permutations (an epoch boundary may fall inside a batch)."""
    if num_examples < 1:
        raise ValueError("no training examples")
    start = step * batch_size
    return [_epoch_order(num_examples, seed, pos // num_examples)[pos % num_examples] for pos in range(start, start + batch_size)]


def rank_micro_batches(indices: list[int], rank: int, world_size: int, accumulation: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch m of rank r is slice (m, r)."""
    micro = len(indices) // (world_size * accumulation)
    return [indices[(m * world_size + rank) * micro:(m * world_size + rank + 1) * micro] for m in range(accumulation)]


def eval_shard(num_examples: int, rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """This rank's evaluation examples, padded (with repeats, marked False) so every rank
    runs the same number of generation batches; ZeRO-3 hangs otherwise."""
    mine = list(range(rank, num_examples, world_size))
    per_rank = -(-num_examples // world_size)
    valid = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    return mine, valid
