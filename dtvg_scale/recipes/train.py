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

import argparse
import errno
import json
import sys
import warnings
from pathlib import Path

import yaml

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()  # before deepspeed is imported: CPU accelerator, world of one

from dtvg_scale.data.benchmark_tasks import MissingSplitError, ProtocolError  # noqa: E402
from dtvg_scale.data.examples import UnknownTaskError  # noqa: E402
from dtvg_scale.data.task_files import TaskFileError, register_task_files  # noqa: E402
from dtvg_scale.outputs.summary import job_columns, runs_table_columns, summarize  # noqa: E402
from dtvg_scale.outputs.tracking import flatten, make_tracker  # noqa: E402
from dtvg_scale.recipes.config import ConfigError, describe_options, load_config  # noqa: E402
from dtvg_scale.recipes.pipeline import Pipeline, StageError  # noqa: E402
from dtvg_scale.runtime.backbone import BackboneError  # noqa: E402
from dtvg_scale.runtime.distributed import barrier, init_distributed, shutdown_distributed  # noqa: E402
from dtvg_scale.runtime.ds_config import load_ds_config  # noqa: E402
from dtvg_scale.runtime.loop import RunStopped, TrainingError, install_stop_handlers  # noqa: E402

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
        pipeline.session.parent_run_id = job.run_id
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


if __name__ == "__main__":
    sys.exit(main())
