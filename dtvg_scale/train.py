"""Train DTVG: Stage I (a prompt per task) then Stage II (the target with DTVG and its ablations).

The command (2 ranks on one machine, ZeRO-3 sharding the frozen backbone)::

    deepspeed --num_gpus 2 dtvg_scale/train.py --ds_config ds_configs/zero3.json

With no other argument it runs the embedded default: a tiny T5 built from a config and the
built-in task suite (nothing is downloaded), and prints the target's score per strategy and the
group DTVG picked over time. Options are ``section.key=value`` (``--help`` lists all), e.g.::

    deepspeed dtvg_scale/train.py --ds_config ds_configs/zero3.json \\
        model.name_or_path=embedded:llama stage2.strategies=[dtvg,all_sources] stage2.threshold=0.01

On CPU-only machines set nothing: the CPU accelerator and the gloo backend are chosen
automatically (``DS_ACCELERATOR=cpu``). On a cluster, see slurm/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script by path (`deepspeed dtvg_scale/train.py`, the README's command: the
    # launcher takes a path, so neither a console script nor `python -m` can stand in). Python
    # would put this folder first on sys.path and make our modules top-level names (`config`,
    # `data`, `metrics`, `distributed`, ... shadowing any package of that name a library
    # imports), so import the package from the repository root instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
import errno
import json
import warnings
from typing import Any

import yaml

from dtvg_scale.distributed import prepare_environment

prepare_environment()  # before deepspeed is imported: CPU accelerator, world of one

from dtvg_scale import group_trace  # noqa: E402
from dtvg_scale.backbone import BackboneError  # noqa: E402
from dtvg_scale.config import Config, ConfigError, describe_options, load_config  # noqa: E402
from dtvg_scale.distributed import barrier, init_distributed, shutdown_distributed  # noqa: E402
from dtvg_scale.engine import RunStopped, TrainingError, install_stop_handlers, load_ds_config  # noqa: E402
from dtvg_scale.stages import Pipeline, StageError  # noqa: E402
from dtvg_scale.benchmark_tasks import MissingSplitError, ProtocolError  # noqa: E402
from dtvg_scale.task_files import TaskFileError, register_task_files  # noqa: E402
from dtvg_scale.tasks import UnknownTaskError, task_relation  # noqa: E402
from dtvg_scale.tracking import flatten, make_tracker  # noqa: E402

# DeepSpeed 0.19 calls collectives torch 2.13 marks deprecated, once per step: pure noise.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

# A write that failed for want of space (a full disk, a quota, a file-size limit): one line, then resume.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

# Mistakes of the user's, reported as one line instead of a traceback.
USER_ERRORS = (ConfigError, BackboneError, StageError, TrainingError, UnknownTaskError, MissingSplitError,
               ProtocolError, TaskFileError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Dynamic Task Vector Grouping: Stage I + Stage II prompt tuning on a frozen backbone.",
        epilog="Options (section.key=value; a unique key may drop its section):\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with options (sections as in the list below)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON config (default: plain data parallel, ZeRO off)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; ignored")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def summarize(cfg: Config, stage1: dict, stage2: dict, zero_shot: dict | None = None,
              max_spans: int = 12) -> tuple[dict[str, Any], str]:
    out = Path(cfg.run.output_dir)
    trace = group_trace.read_rows(out / "stage2" / "dtvg" / group_trace.FILE_NAME)
    spans, share = group_trace.run_lengths(trace), group_trace.selection_share(trace, cfg.data.sources)
    results = {"target": cfg.data.target, "sources": cfg.data.sources, "stage1": stage1, "stage2": stage2,
               "dtvg_group_over_time": spans, "dtvg_selection_share": share,
               **({"zero_shot": zero_shot} if zero_shot else {})}
    metric = (stage1.get(cfg.data.target) or next(iter(stage2.values()), {})).get("reported_metric", "accuracy")
    how = " (predictions by label likelihood)" if cfg.data.eval_mode == "likelihood" else ""
    lines = [f"Target {cfg.data.target}: {metric} of the best-validation prompt{how}"]
    lines.append(f"  {'run':<24}{'validation':>12}{'test':>10}  group at the best step")
    rows = [("zero-shot (no prompt)", zero_shot)] if zero_shot else []
    rows += ([("prompt tuning (Stage I)", stage1[cfg.data.target])] if cfg.data.target in stage1 else [])
    rows += list(stage2.items())
    lines += [f"  {label:<24}{r['validation'][metric]:>12.3f}{r['test'][metric]:>10.3f}  {_group_cell(r)}"
              for label, r in rows]
    if stage1:  # sources are scored on validation only (they have no test split)
        lines.append("Stage-I best validation score per task: " + ", ".join(
            f"{t} {r['validation'][r['reported_metric']]:.3f}" for t, r in stage1.items()))
    shares = {name: share if name == "dtvg" else group_trace.selection_share(
                  group_trace.read_rows(out / "stage2" / name / group_trace.FILE_NAME), cfg.data.sources)
              for name in stage2 if name == "dtvg" or name.startswith("dtvg-")}
    shares = {name: value for name, value in shares.items() if value}
    if shares:
        lines.append("Share of Stage-II steps each source was in the group")
        lines.append(f"  {'source':<16}" + "".join(f"{name:>16}" for name in shares) + "  relation")
        lines += [f"  {source:<16}" + "".join(f"{value[source]:>16.0%}" for value in shares.values())
                  + f"  {task_relation(source)}" for source in cfg.data.sources]
    if spans:
        shown = spans if len(spans) <= max_spans else [spans[round(i * (len(spans) - 1) / (max_spans - 1))] for i in range(max_spans)]
        lines.append(f"DTVG group over time ({len(spans)} stretches" + ("" if shown is spans else f", {max_spans} shown") + "):")
        lines += [f"  steps {g['first_step']:>5}-{g['last_step']:<5} {', '.join(g['group']) or '(target only)'}" for g in shown]
    return results, "\n".join(lines)


def _group_cell(result: dict) -> str:
    """What a row merged at its best step: the group (Stage II), SPoT's source, or nothing."""
    if "spot_source" in result:
        return f"starts from {result['spot_source']}"
    if "group_at_best" in result:
        return ", ".join(result["group_at_best"]) or "(target only)"
    return "-"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        shutdown_distributed()


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # 1) everything that can be checked before a process group or a model exists
        cfg = load_config(args.config, args.overrides)
        raw_ds_config = load_ds_config(args.ds_config) if args.ds_config else {"zero_optimization": {"stage": 0}}
        register_task_files(cfg.data.task_files)
    except (ConfigError, TaskFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ctx = init_distributed()
    install_stop_handlers()
    out = Path(cfg.run.output_dir)
    run = cfg.run
    job = make_tracker(run.tracking, run.tracking_uri, run.experiment, out.parent, ctx.is_main)  # the parent run
    job_status = "FAILED"
    try:  # 2) the stages; each run inside is skipped if done and resumed if interrupted
        pipeline = Pipeline(ctx, cfg, raw_ds_config)
        if ctx.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (out / "ds_config.json").write_text(json.dumps(raw_ds_config, indent=2) + "\n")
        job.start(out.name, flatten(cfg.to_dict()), tags={"job": "true", "target": cfg.data.target,
                                                          "output_dir": str(out.resolve())},
                  record=out / "mlflow_run.json")
        pipeline.parent_run_id = job.run_id
        job.show_columns(runs_table_columns(cfg))
        stage1 = pipeline.stage1() if run.stages in ("all", "stage1") else {}
        stage2 = pipeline.stage2() if run.stages in ("all", "stage2") else {}
        zero_shot = pipeline.zero_shot() if run.zero_shot else None
        barrier()
        if ctx.is_main:  # 3) the summary
            results, text = summarize(cfg, stage1, stage2, zero_shot)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            job.log_metrics(job_columns(cfg, stage1, stage2, zero_shot), step=0)
            job.log_artifact(out / "results.json")
            print(text, flush=True)
            print(f"Outputs: {out.resolve()}", flush=True)
            link = job.ui_link()
            if link and link.startswith("#"):  # a local store: the UI is started by hand
                link = f"mlflow ui --backend-store-uri {job.tracking_uri}, then http://127.0.0.1:5000/{link}"
            if link:
                print(f"MLflow runs: {link}", flush=True)
        job_status = "FINISHED"
    except RunStopped as stop:
        job_status = "KILLED"
        if ctx.is_main:
            print(str(stop), flush=True)
        return 0
    except USER_ERRORS as err:
        if ctx.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        # on the rank that failed to write (another rank may not know): its last complete checkpoint is intact
        print(f"error: no space to write {err.filename or 'a file'} ({err.strerror}); this run's checkpoints before "
              f"it are intact: free space and run the same command again to continue", file=sys.stderr, flush=True)
        return 1
    finally:
        job.finish(job_status)
    return 0


def runs_table_columns(cfg: Config) -> list[str]:
    """The runs table's columns: each run's final scores and group, each job's test scores."""
    job_rows = ["zero_shot", "prompt_tuning", *cfg.stage2.strategies]
    return (["metrics.`final_validation`", "metrics.`final_test`", "metrics.`final_group_size`", "tags.`group`"]
            + [f"metrics.`test_{name}`" for name in job_rows])


def job_columns(cfg: Config, stage1: dict, stage2: dict, zero_shot: dict | None) -> dict[str, float]:
    """The job's row in the runs table: the target's test score per run (its reported metric)."""
    runs = {"zero_shot": zero_shot, "prompt_tuning": stage1.get(cfg.data.target), **stage2}
    return {f"test_{name}": r["test"][r["reported_metric"]] for name, r in runs.items()
            if r and r.get("test") and r["reported_metric"] in r["test"]}


if __name__ == "__main__":
    sys.exit(main())
