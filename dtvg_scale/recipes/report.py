"""Evaluate saved prompts on their targets' test splits and write the paper's table.

    deepspeed --num_gpus 2 dtvg_scale/report.py --ds_config ds_configs/zero3.json \\
        --runs runs/dtvg_rte runs/dtvg_cb --out runs/table [data.local_dir=../shared/data]

Each ``--runs`` folder is a ``train.py`` run directory: its ``config.yaml`` says the backbone,
the target and the data options (``key=value`` arguments override them for every run, e.g. a
``data.local_dir`` on another machine). Every prompt found there is evaluated again, frozen, on
the target's test split: the target's Stage-I prompt (prompt tuning) and each Stage-II strategy's
best-validation prompt. The table (markdown + JSON) has one column per target and the benchmark
averages, with the paper's T5-base rows above ours for comparison. Scores are x100, as in the
paper; each cell is the paper's reported metric for that task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dtvg_scale.data import tasks  # noqa: E402
from dtvg_scale.data.benchmark_tasks import BENCHMARK_GROUPS  # noqa: E402
from dtvg_scale.data.encoding import encode_examples  # noqa: E402
from dtvg_scale.method.config import split_strategy  # noqa: E402
from dtvg_scale.method.prompts import SoftPrompt  # noqa: E402
from dtvg_scale.method.strategies import STRATEGIES  # noqa: E402
from dtvg_scale.recipes.config import ConfigError, load_config  # noqa: E402
from dtvg_scale.recipes.pipeline import Pipeline  # noqa: E402
from dtvg_scale.runtime.backbone import PromptedModel  # noqa: E402
from dtvg_scale.runtime.checkpoint import load_tensors  # noqa: E402
from dtvg_scale.runtime.distributed import init_distributed  # noqa: E402
from dtvg_scale.runtime.ds_config import load_ds_config  # noqa: E402
from dtvg_scale.runtime.evaluation import generate_predictions  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

# The paper's T5-base averages (dtvg_method.md, "Numbers"): per-group averages only.
PAPER_ROWS: dict[str, dict[str, float]] = {
    "Prompt tuning (paper)": {"GLUE": 72.2, "SuperGLUE": 57.8},
    "SPoT (paper)": {"GLUE": 82.3, "SuperGLUE": 62.9},
    "ATTEMPT (paper)": {"GLUE": 83.4, "SuperGLUE": 70.5},
    "MPT (paper)": {"GLUE": 85.6, "SuperGLUE": 74.1},
    "DePT (paper)": {"GLUE": 85.9, "SuperGLUE": 76.5},
    "DTVG (paper)": {"GLUE": 87.4, "SuperGLUE": 78.9},
}


def prompts_of(run_dir: Path, target: str, strategies: list[str]) -> dict[str, Path]:
    """Row label -> prompt file of every prompt the run saved for its target."""
    found = {}
    stage1 = run_dir / "stage1" / target / "best_prompt.safetensors"
    if stage1.is_file():
        found["prompt tuning"] = stage1
    for strategy in strategies:
        path = run_dir / "stage2" / strategy / "best_prompt.safetensors"
        if path.is_file():
            found[strategy] = path
    return found


def evaluate_run(ctx, run_dir: Path, overrides: list[str], raw_ds_config: dict, strategies: list[str]) -> dict:
    """{row label: {metric: value}} for one run directory's target."""
    cfg = load_config(str(run_dir / "config.yaml"), [*overrides, f"run.output_dir={run_dir}"])
    target = cfg.data.target
    files = prompts_of(run_dir, target, strategies)
    if not files:
        raise ConfigError(f"no saved prompt for target {target!r} in {run_dir}")
    pipeline = Pipeline(ctx, cfg, raw_ds_config)
    backbone, ds_config = pipeline.session.load(cfg.stage2)
    splits = pipeline.splits[target]
    encoded = encode_examples(splits.test, backbone.tokenizer, backbone.is_encoder_decoder,
                              cfg.data.max_source_length, cfg.data.max_target_length)
    holder = SoftPrompt(pipeline.session.init_prompt(backbone).to(ctx.device))
    prompted = PromptedModel(backbone.model, holder, backbone.is_encoder_decoder)
    engine, *_ = deepspeed.initialize(model=prompted, config=ds_config)  # inference: shards, no optimizer
    synced = ds_config.get("zero_optimization", {}).get("stage", 0) == 3 and ctx.world_size > 1
    scores = {}
    try:
        for label, path in files.items():
            rows = load_tensors(path)[0]["prompt"].to(ctx.device)
            predictions = generate_predictions(engine.module, rows, encoded, backbone.tokenizer,
                                               cfg.stage2.eval_batch_size, cfg.data.max_target_length,
                                               ctx.rank, ctx.world_size, synced)
            scores[label] = tasks.scorer(target)(predictions, splits.test)
    finally:
        engine.destroy()
    return {"target": target, "reported_metric": tasks.reported_metric(target), "scores": scores,
            "test_examples": len(splits.test)}


def build_table(evaluated: list[dict]) -> tuple[dict[str, Any], str]:
    targets = [e["target"] for e in evaluated]
    ordered = [t for group in BENCHMARK_GROUPS.values() for t in group if t in targets]
    ordered += [t for t in targets if t not in ordered]
    groups = {g: [t for t in members if t in targets] for g, members in BENCHMARK_GROUPS.items()}
    groups = {g: present for g, present in groups.items() if present}
    labels = list(dict.fromkeys(label for e in evaluated for label in e["scores"]))
    by_target = {e["target"]: e for e in evaluated}
    ours: dict[str, dict[str, float | None]] = {}
    for label in labels:
        row: dict[str, float | None] = {}
        for target in ordered:
            entry = by_target[target]
            value = entry["scores"].get(label, {}).get(entry["reported_metric"])
            row[target] = None if value is None else 100 * value
        for group, members in groups.items():
            values = [row[t] for t in members if row[t] is not None]
            row[group] = statistics.fmean(values) if len(values) == len(members) else None
        ours[f"{label} (ours)"] = row
    columns = ordered + list(groups)
    header = "| method | " + " | ".join(
        [f"{t} ({by_target[t]['reported_metric']})" for t in ordered]
        + [f"{g} avg ({len(m)}/{len(BENCHMARK_GROUPS[g])} tasks)" for g, m in groups.items()]) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    for name, row in {**{k: dict(v) for k, v in PAPER_ROWS.items()}, **ours}.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    note = ("Paper rows: T5-base, full data, all tasks of each group; ours: this run's backbone and data, "
            "averaged over the tasks present only. Not comparable unless the protocol matches.")
    return {"columns": columns, "paper": PAPER_ROWS, "ours": ours, "runs": evaluated}, "\n".join(lines) + f"\n\n{note}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--runs", nargs="+", required=True, help="train.py run directories")
    parser.add_argument("--out", required=True, help="output prefix: writes <out>.md and <out>.json")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--ds_config", help="DeepSpeed JSON config (default: ZeRO off)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; ignored")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        raw_ds_config = load_ds_config(args.ds_config) if args.ds_config else {"zero_optimization": {"stage": 0}}
        for run in args.runs:
            if not (Path(run) / "config.yaml").is_file():
                raise ConfigError(f"{run} is not a train.py run directory (no config.yaml)")
            load_config(str(Path(run) / "config.yaml"), [*args.overrides, f"run.output_dir={run}"])  # ranges, folders
        for name in args.strategies:
            try:
                split_strategy(name)
            except ValueError as err:
                raise ConfigError(f"--strategies: {err}") from None
        if any(p.is_file() for p in Path(args.out).resolve().parents) or Path(args.out).with_suffix(".md").is_dir():
            raise ConfigError(f"--out {args.out}: a path prefix below a folder (writes <out>.md and <out>.json)")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ctx = init_distributed()
    with torch.no_grad():
        evaluated = [evaluate_run(ctx, Path(run), args.overrides, raw_ds_config, args.strategies) for run in args.runs]
    if ctx.is_main:
        table, text = build_table(evaluated)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
