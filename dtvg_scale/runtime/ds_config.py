"""The DeepSpeed config of one run: read the user's JSON once (``load_ds_config``: what it may and
may not set), then resolve it for a run (``resolve_ds_config``: batch sizes from the loop, the
precision, ZeRO-3's thresholds sized to the largest trainable tensor so the prompt stays whole
on every rank)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dtvg_scale.options import ConfigError
from dtvg_scale.runtime.options import LoopArgs


def load_ds_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config not found: {file}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {file} must be a JSON object")
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise ConfigError(
                f"DeepSpeed config {file} sets '{owned}'; dtvg_scale builds its own (AdamW with one parameter "
                f"group per learning rate and a linear schedule): remove that section"
            )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {file}: zero_optimization.stage must be 0-3, got {stage!r}")
    return config


def bf16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return accelerator.device_name() != "cpu" and accelerator.is_bf16_supported()


def resolve_precision(precision: str) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and bf16_supported()):
        return torch.bfloat16
    return torch.float32


def resolve_ds_config(
    raw: dict, loop: LoopArgs, world_size: int, dtype: torch.dtype, largest_trainable: int
) -> dict:
    """Fill every ``"auto"`` of a DeepSpeed config for one run.

    ``largest_trainable`` is the numel of the biggest trainable tensor: ZeRO-3 keeps tensors up
    to ``stage3_param_persistence_threshold`` whole on every rank, so the threshold is set just
    there: the prompt and scales stay replicated while every larger (frozen) tensor is sharded.
    """
    config = copy.deepcopy(raw)
    per_step = world_size * loop.gradient_accumulation_steps
    if loop.batch_size % per_step:
        raise ConfigError(
            f"batch size {loop.batch_size} is not divisible by world size {world_size} x "
            f"gradient accumulation {loop.gradient_accumulation_steps}"
        )
    config["train_micro_batch_size_per_gpu"] = loop.batch_size // per_step
    config["gradient_accumulation_steps"] = loop.gradient_accumulation_steps
    config["train_batch_size"] = loop.batch_size
    config["bf16"] = {**config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    if config.get("fp16", {}).get("enabled") is True:
        raise ConfigError("fp16 is not supported (prompt tuning diverges in fp16); use bf16")
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    zero = config.setdefault("zero_optimization", {})
    for key, value in list(zero.items()):
        if value == "auto":
            if key == "stage3_param_persistence_threshold":
                zero[key] = largest_trainable
            else:
                raise ConfigError(f"DeepSpeed config: cannot resolve zero_optimization.{key}='auto'")
    if "offload_optimizer" in zero:
        config["zero_force_ds_cpu_optimizer"] = False  # a torch AdamW over a few KB is fine on CPU
    return config
