"""Our prompt-tuning step against HF PEFT's prompt tuning: same tiny T5, same ZeRO-3 config,
same optimizer, same batches, same prompt length and the same starting prompt.

    # 2 ranks, ZeRO-3 on the CPU (peft is a dependency of the package):
    OMP_NUM_THREADS=1 nice .venv/bin/deepspeed --num_gpus 2 \\
        --master_port $(.venv/bin/python -c 'from dtvg_scale.runtime.distributed import free_port; print(free_port())') \\
        benchmarks/peft_compare.py [--lengths 20 100] [--steps 40]
    # the real SmolLM2-135M-Instruct (dtvg-fetch-model); PEFT's CAUSAL_LM prompt has r rows:
    OMP_NUM_THREADS=1 nice .venv/bin/deepspeed --num_gpus 2 --master_port PORT benchmarks/peft_compare.py \
        --model smollm2 --lengths 20 --batch_size 8 --steps 12 --blocks 6
    # one process (a world of one):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peft_compare.py

Ours: ``SoftPrompt`` + ``PromptedModel`` through ``dtvg_scale.runtime.engine.build_engine``. PEFT:
``get_peft_model(backbone, PromptTuningConfig(task_type=SEQ_2_SEQ_LM, ...))`` handed to
``deepspeed.initialize`` with what ``build_engine`` gives ours (torch AdamW, weight decay 0, the
same linear schedule). Each side loads its own copy of the backbone under ``zero.Init``. PEFT's
seq2seq prompt table has 2r rows (one block per transformer stack; prompt tuning only feeds the
first r to the encoder); its first r rows are set to our P_init, so both start from the same
prompt and their first losses must agree, which the script checks. The ZeRO-3 persistence
threshold is PEFT's table size, so both prompts stay whole on every rank and both backbones are
sharded alike. Timed in alternating blocks; the ratio of medians (ours / PEFT) is printed, beside
an A/A control (a second engine of ours, identical to the first): a ratio no further from 1 than
the control's is within the run's noise.
"""

from __future__ import annotations

import argparse

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()  # before deepspeed is imported: the CPU accelerator, or a world of one

import deepspeed
import step_overhead as bench
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import get_linear_schedule_with_warmup

from dtvg_scale.runtime.backbone import PromptedModel, load_backbone
from dtvg_scale.runtime.distributed import DistContext, init_distributed
from dtvg_scale.runtime.engine import build_engine
from dtvg_scale.method.prompts import SoftPrompt

PROMPT_LR = 0.3  # the project's Stage-I prompt learning rate, for both sides
def peft_prompt_blocks(is_encoder_decoder: bool) -> int:
    """PEFT's prompt table holds one block of r rows per transformer stack: 2 for seq2seq, 1 for a causal LM."""
    return 2 if is_encoder_decoder else 1


def ours_engine(model_path: str, ds_config: dict, length: int, batch_size: int):
    backbone = load_backbone(model_path, model_path, ds_config, torch.float32)
    init = bench.initial_prompt(backbone.model, length)
    module = SoftPrompt(init)
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    groups = [{"params": [module.prompt], "lr": PROMPT_LR}]
    return build_engine(prompted, groups, bench.loop_args(batch_size), ds_config, 0.0), backbone, init


def peft_engine(model_path: str, ds_config: dict, init: torch.Tensor, batch_size: int):
    """PEFT's prompt tuning on its own copy of the backbone, started from our P_init, under the
    engine setup ``build_engine`` gives ours (no checkpoint engine: nothing is saved here)."""
    backbone = load_backbone(model_path, model_path, ds_config, torch.float32)
    task_type = TaskType.SEQ_2_SEQ_LM if backbone.is_encoder_decoder else TaskType.CAUSAL_LM
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=init.shape[0])
    model = get_peft_model(backbone.model, config)
    table = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(init.repeat(peft_prompt_blocks(backbone.is_encoder_decoder), 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == [table], "PEFT should train its prompt table and nothing else"
    optimizer = torch.optim.AdamW([{"params": trainable, "lr": PROMPT_LR}], weight_decay=0.0)
    loop = bench.loop_args(batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, loop.warmup_steps, loop.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def ours_step(engine, batch: dict[str, torch.Tensor], losses: list[float]):
    def step() -> None:
        loss, _ = engine(**batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    return step


def peft_step(engine, batch: dict[str, torch.Tensor], losses: list[float]):
    def step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    return step


def side_name(side: str, length: int) -> str:
    return f"{side} r={length}"


def build_sides(model_path: str, ds_config: dict, length: int, batch_size: int, control: bool) -> tuple[dict, object]:
    """The engines of one prompt length by side ("ours", "peft", and "ours-control": a second,
    identical engine of ours, whose ratio to the first is the run's noise floor)."""
    ours, backbone, init = ours_engine(model_path, ds_config, length, batch_size)
    sides = {"ours": ours, "peft": peft_engine(model_path, ds_config, init, batch_size)}
    if control:
        sides["ours-control"], _, _ = ours_engine(model_path, ds_config, length, batch_size)
    return sides, backbone


def compare(args: argparse.Namespace, ctx: DistContext) -> tuple[list[dict[str, float]], dict[int, float], str]:
    """Every side for every prompt length, timed together; returns every rank's medians, the
    first-step loss difference (ours - PEFT, rank 0's batch) per length, and the setting."""
    model_path, d_model, described = bench.real_backbone(args.model, args)
    largest = peft_prompt_blocks(args.model != "smollm2") * max(args.lengths) * d_model
    ds_config = bench.zero3_config(args.batch_size, ctx.world_size, largest)
    engines, backbone = {}, None
    for length in args.lengths:
        sides, backbone = build_sides(model_path, ds_config, length, args.batch_size, args.control)
        engines.update({side_name(side, length): engine for side, engine in sides.items()})
    batch = bench.rank_batch(backbone.tokenizer, ctx, args.batch_size, backbone.is_encoder_decoder)
    losses = {name: [] for name in engines}
    steppers = {name: (peft_step if name.startswith("peft") else ours_step)(engine, batch, losses[name])
                for name, engine in engines.items()}
    times = bench.interleaved_times(steppers, args.steps, args.blocks)
    first_loss_gap = {r: abs(losses[side_name("ours", r)][0] - losses[side_name("peft", r)][0]) for r in args.lengths}
    total, sharded = bench.backbone_shard_summary(backbone.model)
    for engine in engines.values():
        engine.destroy()  # before the process group goes (an abort at exit otherwise)
    setting = (f"{described} "
               f"({total / 1e6:.2f} M params, {sharded:.0%} in sharded tensors); global batch {args.batch_size}, "
               f"ZeRO-3, {ctx.world_size} rank(s), CPU, fp32; {args.steps} timed steps per engine in "
               f"{args.blocks} alternating blocks")
    return bench.medians_by_rank(times), first_loss_gap, setting


def table(lengths: list[int], medians: list[dict[str, float]], loss_gap: dict[int, float], control: bool) -> list[str]:
    rank0 = medians[0]
    header = "| r | ours ms | PEFT ms | ours / PEFT | first-step loss, ours - PEFT |"
    rule = "|---:|---:|---:|---:|---:|"
    if control:
        header, rule = header + " A/A: ours, 2nd engine / 1st |", rule + "---:|"
    lines = [header, rule]
    for r in lengths:
        ours, peft = side_name("ours", r), side_name("peft", r)
        row = (f"| {r} | {rank0[ours] * 1e3:.1f} | {rank0[peft] * 1e3:.1f} "
               f"| {bench.fmt_ratio(bench.ratio_cells(medians, ours, peft))} | {loss_gap[r]:.1e} |")
        if control:
            row += f" {bench.fmt_ratio(bench.ratio_cells(medians, side_name('ours-control', r), ours))} |"
        lines.append(row)
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 100], help="prompt lengths r")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side and length")
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks the timed steps are split into")
    parser.add_argument("--batch_size", type=int, default=16, help="global batch (over ranks)")
    parser.add_argument("--no_control", dest="control", action="store_false",
                        help="skip the A/A control (a second engine of ours at each length)")
    # wide enough that ZeRO-3 still shards the backbone's matrices at r = 100: the persistence
    # threshold (PEFT's 2r x d table) must stay below d x d
    parser.add_argument("--model", choices=["tiny_t5", "smollm2"], default="tiny_t5",
                        help="tiny_t5: built from --d_model/--layers/--d_ff; smollm2: the real SmolLM2-135M-Instruct")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d_ff", type=int, default=256)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = init_distributed()
    medians, loss_gap, setting = compare(args, ctx)
    if ctx.is_main:
        print(f"\nPrompt-tuning step, dtvg_scale vs HF PEFT: {setting}")
        print("Ratios of median step times: rank 0 (largest over ranks); ms are rank 0's medians.\n")
        print("\n".join(table(args.lengths, medians, loss_gap, args.control)), flush=True)


if __name__ == "__main__":
    main()
