"""Stage-II DTVG step time over a plain prompt-tuning step, same tiny model, same ZeRO-3 engine;
and how both grow with the prompt length r and the number of sources K.

    # DTVG / plain at K = 6 and 128 (tiny T5 d_model 64, r = 8), 2 ranks, ZeRO-3 on the CPU:
    OMP_NUM_THREADS=1 nice .venv/bin/deepspeed --num_gpus 2 \\
        --master_port $(.venv/bin/python -c 'from dtvg_scale.runtime.distributed import free_port; print(free_port())') \\
        benchmarks/step_overhead.py
    # prompt-length scaling (ratios to r = 20, K = 6) on a wider T5: ZeRO-3 keeps every tensor up to
    # the prompt's r x d whole, so d x d must stay above 200 x d for the backbone to be sharded at all
    OMP_NUM_THREADS=1 nice .venv/bin/deepspeed --num_gpus 2 --master_port PORT benchmarks/step_overhead.py \\
        --lengths 20 100 200 --sources 6 128 --d_model 256 --d_ff 256 --batch_size 16 --steps 16 --blocks 8
    # the same in one process (a world of one):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py [--steps 40] [--sources 6 128]
    # the real SmolLM2-135M-Instruct (dtvg-fetch-model), K = 4 real-size and 64 sources:
    OMP_NUM_THREADS=1 nice .venv/bin/deepspeed --num_gpus 2 --master_port PORT benchmarks/step_overhead.py \
        --model smollm2 --lengths 20 --sources 4 64 --batch_size 8 --steps 12 --blocks 6

Every variant (a plain prompt per length, a DTVG prompt per length and K) gets its own DeepSpeed
engine around its own copy of the same frozen backbone, all with the same DeepSpeed config, and
all train on the same batches. The variants are timed in alternating blocks (the order reversed
every round) so that machine noise hits them alike; the ratios of medians are printed. Under the
launcher every rank times the same steps (a barrier starts each block); the table shows rank 0's
ratio and the largest over ranks. An A/A control (a second plain engine, identical to the first)
is timed alongside: its ratio shows how far from 1 noise alone moves a ratio in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()
# DeepSpeed calls a torch collective that torch deprecates, once per step: keep the tables readable
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

import torch
import torch.distributed as dist

from dtvg_scale.data import random_world
from dtvg_scale.runtime.backbone import PromptedModel, load_backbone, read_embedding_rows
from dtvg_scale.recipes.config import Stage2Args
from dtvg_scale.data.encoding import collate_train, encode_examples
from dtvg_scale.runtime.sampling import rank_micro_batches
from dtvg_scale.runtime.distributed import DistContext, barrier, init_distributed, on_main_then_all
from dtvg_scale.runtime.ds_config import resolve_ds_config
from dtvg_scale.runtime.engine import build_engine, optimizer_groups
from dtvg_scale.method.prompts import DTVGPrompt, SoftPrompt, sample_init_prompt

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}, "gradient_clipping": 1.0}
BACKBONE_CACHE = Path("runs/.backbones")
WARMUP_STEPS = 3

# ---------------------------------------------------------------- shared by the benchmarks


@dataclass(frozen=True)
class TinyT5:
    """The frozen backbone's shape (the embedded word-level world, random weights)."""

    d_model: int = 64
    num_layers: int = 2
    d_ff: int = 128  # the embedded default (resolve_model_path does not expose it)

    def path(self) -> str:
        """Build the backbone folder once (rank 0 first: the others then find it complete)."""
        def build() -> str:
            folder = BACKBONE_CACHE / f"embedded_t5_d{self.d_model}_l{self.num_layers}_ff{self.d_ff}_world"
            tokenizer = random_world.build_tokenizer(folder.with_name(folder.name + "_tokenizer"), "t5")
            return random_world.build_tiny_backbone(folder, "t5", tokenizer, d_model=self.d_model,
                                                num_layers=self.num_layers, d_ff=self.d_ff)

        return on_main_then_all(build)


def zero3_config(batch_size: int, world_size: int, largest_trainable: int) -> dict:
    """One resolved ZeRO-3 config for every engine of a run: the persistence threshold (tensors
    up to it stay whole on every rank) depends on the largest trainable tensor, and a threshold
    that differed between variants would shard their backbones differently."""
    return resolve_ds_config(ZERO3, loop_args(batch_size), world_size, torch.float32, largest_trainable)


def loop_args(batch_size: int) -> Stage2Args:
    return Stage2Args(steps=10**6, batch_size=batch_size, warmup_steps=0)


def real_backbone(model: str, args: argparse.Namespace) -> tuple[str, int, str]:
    """(folder, hidden size, description) of the backbone every engine loads."""
    if model == "smollm2":
        from dtvg_scale.recipes.fetch_model import fetch

        return str(on_main_then_all(lambda: fetch("smollm2-135m-instruct")[1])), 576, \
            "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized, 30 layers, hidden 576)"
    return (TinyT5(args.d_model, args.layers, args.d_ff).path(), args.d_model,
            f"tiny T5 d_model {args.d_model}, {args.layers}+{args.layers} layers, d_ff {args.d_ff}")


def rank_batch(tokenizer, ctx: DistContext, batch_size: int, is_encoder_decoder: bool = True) -> dict[str, torch.Tensor]:
    """This rank's slice of one global batch of the embedded target task (the same every step)."""
    task = random_world.embedded_task("emb_target", n_train=batch_size)
    examples = encode_examples(task.train, tokenizer, is_encoder_decoder, 256, 20)
    (mine,) = rank_micro_batches(list(range(batch_size)), ctx.rank, ctx.world_size, 1)
    return collate_train([examples[i] for i in mine], tokenizer.pad_token_id, is_encoder_decoder)


def tokens_per_rank_step(batch: dict[str, torch.Tensor], prompt_length: int) -> int:
    """Tokens one rank's forward sees per step: its inputs (targets included) and the prompt rows."""
    return int(batch["attention_mask"].sum()) + prompt_length * batch["attention_mask"].shape[0]


def backbone_shard_summary(model: torch.nn.Module) -> tuple[int, float]:
    """(parameters, fraction of them in tensors ZeRO-3 partitions rather than keeps whole)."""
    params = list(model.parameters())
    total = sum(p.ds_numel for p in params)
    sharded = sum(p.ds_numel for p in params if not getattr(p, "ds_persist", False))
    return total, sharded / total


def initial_prompt(model: torch.nn.Module, length: int) -> torch.Tensor:
    """P_init as the project draws it (distinct vocabulary rows); the embedded world has only
    ~80 rows, so a longer prompt repeats rows (drawn with a fixed seed): values do not matter
    for timing, their scale does."""
    def draw(weight: torch.Tensor) -> torch.Tensor:
        if length <= weight.shape[0]:
            return sample_init_prompt(weight, length, 5000, 42)
        ids = torch.randint(weight.shape[0], (length,), generator=torch.Generator().manual_seed(42))
        return weight[ids].detach().clone()

    return read_embedding_rows(model, draw)


def time_block(step: Callable[[], object], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(steppers: dict[str, Callable[[], object]], steps: int, blocks: int) -> dict[str, list[float]]:
    """Per-step times of each variant, from ``blocks`` rounds of one block each; the order is
    reversed every other round so no variant always runs right after the same neighbour. The
    barrier lines the ranks up, so every rank times the same steps."""
    for step in steppers.values():  # warm-up: first-call allocations, lazy initialisation
        time_block(step, WARMUP_STEPS)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    per_block = max(1, steps // blocks)
    for round_index in range(blocks):
        for name in names if round_index % 2 == 0 else reversed(names):
            barrier()
            times[name] += time_block(steppers[name], per_block)
    return times


def medians_by_rank(times: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every rank's median step time per variant (rank order), on every rank."""
    mine = {name: statistics.median(values) for name, values in times.items()}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def ratio_cells(medians: list[dict[str, float]], numerator: str, denominator: str) -> tuple[float, float]:
    """(rank 0's ratio, the largest ratio over ranks) of two variants' median step times."""
    ratios = [rank[numerator] / rank[denominator] for rank in medians]
    return ratios[0], max(ratios)


def fmt_ratio(cells: tuple[float, float]) -> str:
    return f"{cells[0]:.3f} ({cells[1]:.3f})"


# ---------------------------------------------------------------- this benchmark


@dataclass(frozen=True)
class Variant:
    kind: str  # "plain" or "dtvg"
    length: int
    sources: int = 0
    control: bool = False  # a second, identical plain engine: its ratio to the first is the noise floor
    # DTVG's three trainable tensors in three optimizer groups (as when their learning rates
    # differ) instead of the project's one: a diagnostic for what groups cost, since ZeRO-3
    # all-reduces the gradient norm once per group
    three_groups: bool = False

    @property
    def name(self) -> str:
        name = f"plain r={self.length}" if self.kind == "plain" else f"dtvg r={self.length} K={self.sources}"
        return name + (" (control)" if self.control else "") + (" (three groups)" if self.three_groups else "")


def variants_of(lengths: list[int], sources: list[int], control: bool, three_groups: bool = False) -> list[Variant]:
    plain = [Variant("plain", r) for r in lengths]
    dtvg = [Variant("dtvg", r, k) for r in lengths for k in sources]
    diagnostic = [Variant("dtvg", lengths[0], k, three_groups=True) for k in sources] if three_groups else []
    return plain + dtvg + diagnostic + ([Variant("plain", lengths[0], control=True)] if control else [])


def largest_trainable(variants: list[Variant], d_model: int) -> int:
    """The prompt is [r, d]; DTVG adds target scales [r] and source scales [K, r]."""
    return max(max(v.length * d_model, v.sources * v.length) for v in variants)


def prompt_module(variant: Variant, init: torch.Tensor) -> tuple[torch.nn.Module, list[dict]]:
    """The prompt module and its optimizer groups (the project's Stage-I / Stage-II learning rates)."""
    if variant.kind == "plain":
        module = SoftPrompt(init)
        return module, [{"params": [module.prompt], "lr": 0.3}]
    generator = torch.Generator().manual_seed(variant.sources)  # task vectors of Stage-I's size
    source_tvs = 0.1 * torch.randn(variant.sources, *init.shape, generator=generator)
    target = init + 0.1 * torch.randn(init.shape, generator=generator)
    module = DTVGPrompt(init, target, source_tvs)
    named = [("prompt", module.prompt, 1e-3), ("target_scale", module.target_scale, 1e-3),
             ("source_scales", module.source_scales, 1e-3)]
    if variant.three_groups:
        return module, [{"params": [p], "lr": lr} for _, p, lr in named]
    groups = optimizer_groups(named)  # as Stage II builds them: one group per learning rate
    return module, groups


def build_variant(variant: Variant, model_path: str, ds_config: dict, batch_size: int):
    backbone = load_backbone(model_path, model_path, ds_config, torch.float32)
    init = initial_prompt(backbone.model, variant.length)
    module, groups = prompt_module(variant, init)
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    return build_engine(prompted, groups, loop_args(batch_size), ds_config, 0.0), backbone


def training_step(engine, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        loss, _ = engine(**batch)
        engine.backward(loss)
        engine.step()

    return step


def measure(args: argparse.Namespace, ctx: DistContext) -> tuple[list[Variant], list[dict[str, float]], str]:
    model_path, d_model, described = real_backbone(args.model, args)
    variants = variants_of(args.lengths, args.sources, args.control, args.three_groups)
    ds_config = zero3_config(args.batch_size, ctx.world_size, largest_trainable(variants, d_model))
    engines, backbone = {}, None
    for variant in variants:
        engines[variant.name], backbone = build_variant(variant, model_path, ds_config, args.batch_size)
    batch = rank_batch(backbone.tokenizer, ctx, args.batch_size, backbone.is_encoder_decoder)
    args.tokens_per_rank_step = tokens_per_rank_step(batch, args.lengths[0])
    steppers = {name: training_step(engine, batch) for name, engine in engines.items()}
    times = interleaved_times(steppers, args.steps, args.blocks)
    total, sharded = backbone_shard_summary(backbone.model)
    for engine in engines.values():
        engine.destroy()  # before the process group goes (an abort at exit otherwise)
    threshold = ds_config["zero_optimization"]["stage3_param_persistence_threshold"]
    setting = (f"{described} "
               f"({total / 1e6:.2f} M params, {sharded:.0%} in tensors ZeRO-3 shards at threshold {threshold}); "
               f"global batch {args.batch_size}, ZeRO-3, {ctx.world_size} rank(s), CPU, fp32; "
               f"{args.steps} timed steps per variant in {args.blocks} alternating blocks; the first (r, K) "
               f"is r0, K0")
    return variants, medians_by_rank(times), setting


def control_line(variants: list[Variant], medians: list[dict[str, float]]) -> str:
    """The A/A ratio: two identical plain engines timed like the others. A ratio between
    variants that is no further from 1 than this is within this run's noise."""
    control = next((v for v in variants if v.control), None)
    if control is None:
        return ""
    twin = Variant("plain", control.length)
    return (f"\nA/A control (a second, identical plain engine at r={control.length} / the first): "
            f"{fmt_ratio(ratio_cells(medians, control.name, twin.name))}")


def three_group_lines(variants: list[Variant], medians: list[dict[str, float]]) -> str:
    """DTVG with three optimizer groups over plain, and over the same DTVG with one group."""
    lines = [f"\nDTVG r={v.length} K={v.sources}, three optimizer groups: / plain "
             f"{fmt_ratio(ratio_cells(medians, v.name, Variant('plain', v.length).name))}, "
             f"/ one group {fmt_ratio(ratio_cells(medians, v.name, Variant('dtvg', v.length, v.sources).name))}"
             for v in variants if v.three_groups]
    return "".join(lines)


def overhead_table(variants: list[Variant], medians: list[dict[str, float]]) -> list[str]:
    """DTVG step / plain step at the same r, and each variant over the first (r, K): the scaling."""
    base_plain = next(v for v in variants if v.kind == "plain")
    base_dtvg = next(v for v in variants if v.kind == "dtvg")
    rank0 = medians[0]
    lines = ["| r | K | plain ms | DTVG ms | DTVG / plain | plain / plain(r0) | DTVG / DTVG(r0, K0) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for v in (v for v in variants if v.kind == "dtvg" and not v.three_groups):
        plain = Variant("plain", v.length)
        lines.append(
            f"| {v.length} | {v.sources} | {rank0[plain.name] * 1e3:.1f} | {rank0[v.name] * 1e3:.1f} "
            f"| {fmt_ratio(ratio_cells(medians, v.name, plain.name))} "
            f"| {fmt_ratio(ratio_cells(medians, plain.name, base_plain.name))} "
            f"| {fmt_ratio(ratio_cells(medians, v.name, base_dtvg.name))} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--blocks", type=int, default=20, help="alternating blocks the timed steps are split into")
    parser.add_argument("--no_control", dest="control", action="store_false",
                        help="skip the A/A control (a second plain engine at the first length)")
    parser.add_argument("--three_groups", action="store_true",
                        help="also time DTVG with its 3 trainable tensors in 3 optimizer groups (a diagnostic)")
    parser.add_argument("--sources", type=int, nargs="+", default=[6, 128], help="K; the first is the baseline")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8], help="prompt lengths r; the first is the baseline")
    parser.add_argument("--batch_size", type=int, default=32, help="global batch (over ranks)")
    parser.add_argument("--model", choices=["tiny_t5", "smollm2"], default="tiny_t5",
                        help="tiny_t5: built from --d_model/--layers/--d_ff; smollm2: the real SmolLM2-135M-Instruct")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d_ff", type=int, default=128)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[tuple[Variant, float, float]]:
    """Returns rank 0's (DTVG variant, plain median s, DTVG median s) rows."""
    args = parse_args(argv)
    ctx = init_distributed()
    variants, medians, setting = measure(args, ctx)
    if ctx.is_main:
        print(f"\nStep time, Stage-II DTVG vs plain prompt tuning: {setting}")
        print("Ratios of median step times: rank 0 (largest over ranks); ms are rank 0's medians.\n")
        print("\n".join(overhead_table(variants, medians)) + three_group_lines(variants, medians)
              + control_line(variants, medians), flush=True)
        plain = medians[0][Variant("plain", args.lengths[0]).name]
        print(f"\nThroughput, plain r={args.lengths[0]}: {args.tokens_per_rank_step} tokens per rank per step "
              f"(prompt rows included), {args.tokens_per_rank_step / plain:.0f} tokens/s per rank "
              f"(forward + backward, rank 0's median step {plain * 1e3:.0f} ms)", flush=True)
    return [(v, medians[0][Variant("plain", v.length).name], medians[0][v.name])
            for v in variants if v.kind == "dtvg" and not v.three_groups]


if __name__ == "__main__":
    main()
