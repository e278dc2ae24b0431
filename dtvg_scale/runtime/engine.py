"""The DeepSpeed engine around a prompted backbone: only the prompt module trains (checked), an
AdamW over its parameter groups with a linear warmup then decay, checkpoints without the frozen
backbone (aliases of frozen parameters included), and the prompt's rows read whole under ZeRO-3."""

from __future__ import annotations

import logging
from typing import Any, Callable

import deepspeed
import torch
from torch import Tensor, nn

from dtvg_scale.options import ConfigError
from dtvg_scale.runtime.backbone import PromptedModel
from dtvg_scale.runtime.checkpoint import SafetensorsCheckpointEngine
from dtvg_scale.runtime.options import LoopArgs

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def check_trainable(model: PromptedModel) -> list[nn.Parameter]:
    """Only the prompt module trains: anything else trainable, or nothing, is a setup error."""
    leaked = [name for name, p in model.backbone.named_parameters() if p.requires_grad]
    if leaked:
        raise ConfigError(f"the backbone must be frozen, but {len(leaked)} of its parameters train (e.g. {leaked[0]})")
    trainable = [p for p in model.prompt.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("nothing to train: the prompt module has no trainable parameter")
    return trainable


def optimizer_groups(named: list[tuple[str, nn.Parameter, float]]) -> list[dict]:
    """AdamW groups from ``(name, parameter, learning rate)``: one group per distinct learning
    rate, in first-seen order. AdamW treats every parameter alike within a group, so merging
    changes no update; it saves collectives, because ZeRO-3 all-reduces the gradient norm once
    per group (DTVG's prompt and scales share one learning rate by default, as in the paper)."""
    groups: dict[float, dict] = {}
    for name, param, lr in named:
        group = groups.setdefault(lr, {"params": [], "lr": lr, "name": ""})
        group["params"].append(param)
        group["name"] = f"{group['name']}+{name}" if group["name"] else name
    return list(groups.values())


def linear_warmup_then_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of transformers' ``get_linear_schedule_with_warmup`` (0 -> 1 over
    the warmup, then linearly to 0 at ``total_steps``), in the same float operations so the
    schedule is bitwise the same. Written here because importing ``transformers.optimization``
    imports ``trainer_utils`` and with it all of PEFT, ~1 s in every rank of every launch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    return factor


def build_engine(model: PromptedModel, param_groups: list[dict], loop: LoopArgs, ds_config: dict, weight_decay: float):
    check_trainable(model)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_decay(loop.warmup_steps, loop.steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.checkpoint_engine = SafetensorsCheckpointEngine()
    _exclude_frozen_aliases(engine)
    return engine


def _exclude_frozen_aliases(engine) -> None:
    """Checkpoints hold the trainable state only. DeepSpeed's ``exclude_frozen_parameters`` drops
    each frozen parameter under the one name ``named_parameters()`` gives it, so a tied table's
    other names (T5's ``shared`` is also ``encoder.embed_tokens``, ``decoder.embed_tokens`` and
    ``lm_head``; a tied LLaMA's ``lm_head`` is its ``embed_tokens``) stayed in every checkpoint
    below ZeRO-3: for t5-3b 0.4 GB per checkpoint. Drop every name of every frozen parameter;
    buffers (the prompt module's measured transfer gains among them) stay."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            prefix = kwargs.get("prefix", "")
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(prefix + name, None)
        return state

    engine.module_state_dict = module_state_dict


def gathered_prompt(prompted: PromptedModel) -> tuple[Tensor, Any]:
    """The prompt rows as they are now (no grad), whole even if ZeRO-3 partitioned them, and the
    prompt module's record of how it built them (None for a plain prompt)."""
    params = list(prompted.prompt.parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        rows, record = prompted.prompt()
        return rows.detach().clone(), record


def ds_stage(engine) -> int:
    return int(engine.zero_optimization_stage())
