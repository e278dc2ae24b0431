"""Search DTVG's grouping knobs with Ray Tune; every trial is a real Stage-II run tracked in MLflow.

    # on a laptop / one node: Stage I once, then 8 trials, 2 at a time
    dtvg-sweep --out runs/sweep --num_samples 8 --max_concurrent 2 \\
        target=rte sources=[qnli,sst2] data.local_dir=../shared/data
    # on a running Ray cluster (slurm/tune.sbatch starts one), reusing Stage-I outputs
    dtvg-sweep --address auto --stage1_dir runs/rte/stage1 --out runs/sweep ...

(``dtvg-sweep`` is this module's console script; ``python tune/sweep.py`` is the same command.)

Stage I is computed once (or taken from ``--stage1_dir``) and shared by every trial; a trial is
``train.py run.stages=stage2 stage2.strategies=[dtvg]`` with the trial's values of the searched
options, reporting the validation score at every evaluation. Search: Optuna (TPE) with ASHA
early stopping on that score, or a grid (``--search grid``). Searched: ``stage2.threshold``,
``stage2.kc_weight`` (λ, with "kc_only" for the authors' rule), ``stage2.max_group_size``, the
two scale learning rates, and with ``--variants`` the similarity, selection, merge and ranking variants.
Each trial is an MLflow run (Ray's MLflowLoggerCallback: FINISHED, FAILED or stopped by ASHA and
then FINISHED, never left RUNNING), named by its values of the searched knobs and nested under
the sweep's own run (one per ``--out`` folder; a sweep started again reopens it), with its run
folder (group trace, heatmap, prompts) as artifacts; the best trial is tagged ``best_trial=true``
and its validation score and values are on the sweep's run; the best trial's
complete config is written to ``<out>/best_config.yaml``, ready for
``train.py --config <out>/best_config.yaml``.

Faults: a crashed trial does not stop the sweep (its MLflow run ends FAILED; ``best.json`` lists
every trial with its status, score, Ray node and error). A sweep whose driver died (``kill -9``,
a time limit) continues when the same command is started again (Tune's restore): finished and
crashed trials stay as they were, trials cut off run again, and the runs the dead driver had
opened for them end KILLED. One exception, Ray's (2.60): a trial that crashed shortly before the
driver died may have been saved as still running (Tune saves a trial's ERROR only if it handles the
failed task before Ray reports the dead worker); the restore then runs it again like a cut-off trial.

Trials of one rank run in the Tune worker process itself (a process group of one);
``--ranks_per_trial N`` runs each trial on N ranks through Ray Train's TorchTrainer (Train V2: a
driver function per trial) with DeepSpeed inside.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dtvg_scale.data.task_files import TaskFileError, register_task_files
from dtvg_scale.outputs.tracking import EXPERIMENT_KIND_TAG, PARENT_TAG, TRAINING_KIND, MLflowTracker
from dtvg_scale.recipes.config import ConfigError, load_config

PACKAGE = Path(__file__).resolve().parents[1]  # dtvg_scale/: train.py, the path the launcher takes

KC_ONLY, NO_CAP = "kc_only", "none"  # categorical stand-ins for null (the authors' rule / no cap)


def search_space(search: str, variants: bool) -> dict[str, Any]:
    from ray import tune

    if search == "grid":
        space = {
            "stage2.threshold": tune.grid_search([0.0, 0.05]),
            "stage2.kc_weight": tune.grid_search([KC_ONLY, 1.0]),
        }
    else:
        space = {
            "stage2.threshold": tune.uniform(-0.05, 0.5),
            "stage2.kc_weight": tune.choice([KC_ONLY, 0.25, 0.5, 1.0, 2.0, 4.0]),
            "stage2.max_group_size": tune.choice([NO_CAP, 1, 2, 3, 4]),
            "stage2.source_scale_lr": tune.loguniform(1e-4, 1e-1),
            "stage2.target_scale_lr": tune.loguniform(1e-4, 1e-1),
        }
    if variants:
        from dtvg_scale.method.config import VARIANT_KNOBS

        space["stage2.similarity"] = tune.choice(list(VARIANT_KNOBS["similarity"]))
        space["stage2.merge"] = tune.choice(list(VARIANT_KNOBS["merge"]))
        space["stage2.selection"] = tune.choice(["greedy_prefix", "exact"])
        space["stage2.ranking"] = tune.choice(list(VARIANT_KNOBS["ranking"]))
    return space


SHORT_NAMES = {"stage2.threshold": "threshold", "stage2.kc_weight": "kc_weight", "stage2.max_group_size": "max_group",
               "stage2.source_scale_lr": "source_lr", "stage2.target_scale_lr": "target_lr"}


def trial_name(trial_config: dict[str, Any], trial_id: str) -> str:
    """A trial's MLflow run name: its values of the searched knobs (every one of them differs
    from trial to trial), short, then the trial id (what ``tag_best`` matches on)."""
    parts = []
    for key, value in sorted(trial_config.items()):
        name = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts) + f" ({trial_id})"


def trial_overrides(trial_config: dict[str, Any]) -> list[str]:
    """A trial's sampled values as train.py ``key=value`` arguments."""
    out = []
    for key, value in trial_config.items():
        if value in (KC_ONLY, NO_CAP):
            value = None
        out.append(f"{key}={json.dumps(value)}")
    return out


def run_stage2(trial_config: dict[str, Any], settings: dict[str, Any]) -> None:
    """One trial: Stage II (DTVG) with the trial's options, reporting every validation to Tune.
    Runs inside a Tune worker (one rank) or on every Ray Train worker (several ranks)."""
    from ray import tune

    from dtvg_scale.outputs import group_trace
    from dtvg_scale.outputs.plots import group_trace_heatmap, similarity_over_time
    from dtvg_scale.recipes.pipeline import Pipeline
    from dtvg_scale.runtime.distributed import free_port, init_distributed

    one_rank = settings["ranks"] == 1
    trial_dir = Path(tune.get_context().get_trial_dir()) if one_rank else Path(settings["trial_dir"])
    run_dir = trial_dir / "run"
    if one_rank:  # a process group of one, on a port of its own (trials run side by side)
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    else:  # Ray Train built the process group; tell DeepSpeed which rank this worker is
        import ray.train

        context = ray.train.get_context()
        os.environ.update({"RANK": str(context.get_world_rank()), "LOCAL_RANK": str(context.get_local_rank()),
                           "WORLD_SIZE": str(context.get_world_size()),
                           "LOCAL_WORLD_SIZE": str(context.get_local_world_size())})
    overrides = [*settings["overrides"], *trial_overrides(trial_config), "run.stages=stage2",
                 f"run.stage1_dir={settings['stage1_dir']}", "stage2.strategies=[dtvg]",
                 f"run.output_dir={run_dir}", "run.progress=false",
                 "run.tracking=false"]  # the sweep's MLflowLoggerCallback tracks the trial
    cfg = load_config(settings["config"], overrides)
    ctx = init_distributed()

    import ray

    node = ray.get_runtime_context().get_node_id()  # which Ray node ran the trial (best.json lists it)

    reported: list[int] = []

    def report(step: int, scores: dict[str, float]) -> None:
        reported.append(step)
        metrics = {"validation_mean": scores["mean"], "step": step, "node": node,
                   **{f"validation_{k}": v for k, v in scores.items() if k != "mean"}}
        if one_rank:
            tune.report(metrics)
        else:  # every worker reports (a collective); TuneReportCallback passes rank 0's on to Tune
            import ray.train

            ray.train.report(metrics)

    if ctx.is_main:  # the trial's complete config: best_config.yaml is this file of the best trial
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    Pipeline(ctx, cfg, settings["ds_config"], on_evaluate=report).stage2()
    if not reported:
        # a trial started again after its last evaluation (its sweep was killed between the trial's
        # last checkpoint and Tune recording its end) resumes with nothing left to evaluate; Tune
        # needs a result with the metric (else the whole sweep stops), so the last one is said again
        report(*last_evaluation(run_dir / "stage2" / "dtvg" / "metrics.jsonl"))
    if ctx.is_main:
        trace = run_dir / "stage2" / "dtvg" / group_trace.FILE_NAME
        group_trace_heatmap(trace, trial_dir / "group_trace_heatmap.png")
        similarity_over_time(trace, trial_dir / "similarity_over_time.png")


def last_evaluation(metrics_path: Path) -> tuple[int, dict[str, float]]:
    """The step and validation scores of a run's last evaluation (its ``metrics.jsonl``)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    last = [row for row in rows if "validation" in row][-1]
    return last["step"], last["validation"]


def run_stage2_on_ranks(trial_config: dict[str, Any], settings: dict[str, Any]) -> None:
    """A trial on several ranks: the trial's driver function starts a TorchTrainer whose
    workers each run ``run_stage2`` (DeepSpeed sees Ray Train's process group)."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_dir = tune.get_context().get_trial_dir()
    settings = {**settings, "trial_dir": trial_dir}
    trainer = TorchTrainer(
        lambda: run_stage2(trial_config, settings),
        scaling_config=ScalingConfig(num_workers=settings["ranks"], use_gpu=settings["use_gpu"]),
        torch_config=TorchConfig(backend="nccl" if settings["use_gpu"] else "gloo"),
        run_config=RunConfig(name="train", storage_path=str(Path(trial_dir).resolve()),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def ensure_stage1(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Stage I once for the whole sweep (skipped when its outputs exist: train.py resumes)."""
    if args.stage1_dir:
        return Path(args.stage1_dir).resolve()
    stage1_run = Path(args.out).resolve() / "stage1_run"
    command = [sys.executable, str(PACKAGE / "train.py"), *(["--config", args.config] if args.config else []),
               *(["--ds_config", args.ds_config] if args.ds_config else []), *overrides,
               "run.stages=stage1", f"run.output_dir={stage1_run}", "run.progress=false"]
    print(f"Stage I once for the sweep: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=PACKAGE.parent)
    return stage1_run / "stage1"


def tag_best(tracking_uri: str, experiment: str, best_trial_id: str) -> None:
    """Tag the best trial's MLflow run (the callback names runs after the trial: <name>_<trial id>)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    for run in client.search_runs([experiment_id], filter_string=f"tags.trial_name LIKE '%({best_trial_id})'"):
        client.set_tag(run.info.run_id, "best_trial", "true")


def end_orphan_runs(tracking_uri: str, experiment: str, out: Path, sweep_run_id: str | None) -> list[str]:
    """Trial runs of this sweep still RUNNING once every trial is over were started by a sweep
    that was killed (``kill -9``, a lost head node): their trials ran again, so end them KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    ended = []
    for run in client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.sweep = '{out}'"):
        if run.info.run_id != sweep_run_id:
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_name)
    return ended


def trial_summaries(results) -> list[dict[str, Any]]:
    """One line per trial for best.json: its name, how it ended, its last score, the Ray node that
    ran it, and for a crashed trial the last line of its error."""
    summaries = []
    for result in results:
        trial_id = Path(result.path).name.removeprefix("dtvg_trial_")
        # a trial that crashed before its first report has no config in its result; Tune's
        # params.json in the trial folder has it from the start
        config = result.config or json.loads((Path(result.path) / "params.json").read_text())
        summary = {"trial": trial_name(config, trial_id), "status": "ERROR" if result.error else "TERMINATED",
                   "validation_mean": (result.metrics or {}).get("validation_mean"),
                   "node": (result.metrics or {}).get("node")}
        if result.error:
            summary["error"] = (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1]
        summaries.append(summary)
    return summaries


def new_tuner(trainable, args: argparse.Namespace, experiment: str, out: Path, tracking_uri: str,
              sweep_run_id: str | None):
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    return tune.Tuner(
        trainable,
        param_space=search_space(args.search, args.variants),
        tune_config=tune.TuneConfig(
            metric="validation_mean", mode="max", num_samples=args.num_samples,
            max_concurrent_trials=args.max_concurrent,
            search_alg=OptunaSearch(seed=0) if args.search == "optuna" else None,
            scheduler=ASHAScheduler(time_attr="training_iteration", grace_period=args.grace_period,
                                    reduction_factor=2),
            trial_name_creator=lambda trial: trial_name(trial.config, trial.trial_id),
            trial_dirname_creator=lambda trial: f"dtvg_trial_{trial.trial_id}",  # a folder name without spaces
        ),
        run_config=tune.RunConfig(
            name=experiment, storage_path=str(out / "ray"), verbose=0,
            callbacks=[MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=experiment, save_artifact=True,
                                            tags={"sweep": str(out), **({PARENT_TAG: sweep_run_id} if sweep_run_id else {})})],
        ),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="sweep folder: Stage I, Ray results, best_config.yaml")
    parser.add_argument("--config", help="base YAML config for train.py (the searched keys are overridden)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON config of every trial")
    parser.add_argument("--stage1_dir", help="reuse these Stage-I outputs instead of computing them")
    parser.add_argument("--search", choices=["optuna", "grid"], default="optuna")
    parser.add_argument("--variants", action="store_true", help="also search similarity, selection and merge")
    parser.add_argument("--num_samples", type=int, default=8, help="trials (with --search grid: repeats of the grid)")
    parser.add_argument("--max_concurrent", type=int, default=2)
    parser.add_argument("--cpus_per_trial", type=float, default=1.0)
    parser.add_argument("--gpus_per_trial", type=float, default=0.0)
    parser.add_argument("--ranks_per_trial", type=int, default=1)
    parser.add_argument("--grace_period", type=int, default=1, help="ASHA: evaluations before a trial may stop")
    parser.add_argument("--address", help="Ray cluster address ('auto' on a cluster); default: a local Ray")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--tracking_uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in --out)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: dtvg-sweep-<out name>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument in its range, and a ``--stage1_dir`` that holds what the trials read, before
    Ray or Stage I start (a bad one would otherwise fail in every trial, or never be placed)."""
    cfg = load_config(args.config, args.overrides)
    try:
        register_task_files(cfg.data.task_files)
    except TaskFileError as err:
        raise ConfigError(str(err)) from err
    for name, low, strict in (("num_samples", 1, False), ("max_concurrent", 1, False), ("cpus_per_trial", 0, True),
                              ("gpus_per_trial", 0, False), ("ranks_per_trial", 1, False), ("grace_period", 1, False),
                              ("num_cpus", 1, False)):
        value = getattr(args, name)
        if value is not None and (value <= low if strict else value < low):
            raise ConfigError(f"--{name} must be {'>' if strict else '>='} {low}, got {value}")
    if Path(args.out).is_file():
        raise ConfigError(f"--out {args.out} is a file; give a folder (existing or new)")
    if args.stage1_dir:
        tasks_needed = [cfg.data.target, *cfg.data.sources]
        missing = [t for t in tasks_needed if not (Path(args.stage1_dir) / t / "best_prompt.safetensors").is_file()]
        if missing:
            raise ConfigError(f"--stage1_dir {args.stage1_dir} has no Stage-I prompt of {', '.join(missing)} (every "
                              f"task of the run needs <stage1_dir>/<task>/best_prompt.safetensors)")
    if not args.address:  # a local Ray of --num_cpus (default: every core): can one trial ever be placed?
        check_trial_fits(args, float(args.num_cpus or os.cpu_count() or 1), "the local Ray (--num_cpus)")


def trial_cpus(args: argparse.Namespace) -> float:
    """CPUs one trial holds: its own, or (several ranks) a 0.1-CPU driver and one CPU per Ray Train worker."""
    return args.cpus_per_trial if args.ranks_per_trial == 1 else 0.1 + args.ranks_per_trial


def check_trial_fits(args: argparse.Namespace, cpus: float, where: str) -> None:
    if trial_cpus(args) > cpus:
        raise ConfigError(f"a trial needs {trial_cpus(args):g} CPUs (--ranks_per_trial {args.ranks_per_trial}, "
                          f"--cpus_per_trial {args.cpus_per_trial:g}) but {where} has {cpus:g}: it could never start; "
                          f"use fewer ranks per trial or more CPUs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:  # fail on bad options before Ray or Stage I start
        check_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # trials on several ranks: Train V2's driver-per-trial API
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import optuna
    import ray
    from ray import tune

    from dtvg_scale.runtime.ds_config import load_ds_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    stage1_dir = ensure_stage1(args, args.overrides)
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    experiment = args.experiment or f"dtvg-sweep-{out.name}"
    ds_config = load_ds_config(args.ds_config) if args.ds_config else {"zero_optimization": {"stage": 0}}
    if tracking_uri.startswith("sqlite:"):  # else MLflow puts the artifacts in ./mlruns of the current folder
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=(out / "mlruns").as_uri(),
                                     tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    # the sweep's own run, the parent of every trial's (reopened when the sweep is started again)
    sweep_run = MLflowTracker(tracking_uri, experiment, out)
    sweep_run.start(f"sweep {out.name}", {"num_samples": args.num_samples, "search": args.search,
                                          "variants": args.variants, "overrides": args.overrides},
                    tags={"sweep": str(out)}, record=out / "mlflow_run.json")
    sweep_run.show_columns(["metrics.`validation_mean`", "tags.`best_trial`", "tags.`trial_name`",
                            *(f"params.`{key}`" for key in search_space(args.search, args.variants))])
    sweep_status = "FAILED"
    settings = {"overrides": args.overrides, "config": args.config, "stage1_dir": str(stage1_dir),
                "ds_config": ds_config, "ranks": args.ranks_per_trial, "use_gpu": args.gpus_per_trial > 0}

    try:
        if args.address:
            ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
            check_trial_fits(args, ray.cluster_resources().get("CPU", 0.0), f"the Ray cluster at {args.address}")
        else:
            # "local": a Ray of our own, even where `ray start` left a cluster that ray.init() would join
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")

        def dtvg_trial(config: dict[str, Any]) -> None:
            (run_stage2 if args.ranks_per_trial == 1 else run_stage2_on_ranks)(config, settings)

        # a trial on several ranks only drives its TorchTrainer, which asks Ray for the workers
        resources = ({"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial} if args.ranks_per_trial == 1
                     else {"cpu": 0.1})
        trainable = tune.with_resources(dtvg_trial, resources)
        experiment_path = out / "ray" / experiment
        if tune.Tuner.can_restore(str(experiment_path)):  # a sweep stopped earlier (time limit): go on
            print(f"Resuming the sweep in {experiment_path}", flush=True)
            # unfinished trials start again; a crashed one stays crashed (it is in the summary)
            tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=False)
        else:
            tuner = new_tuner(trainable, args, experiment, out, tracking_uri, sweep_run.run_id)
        # slurm's warning before the time limit: stop the way Ctrl-C does (Tune saves its state)
        signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGINT))
        results = tuner.fit()
        trials = trial_summaries(results)
        failed = [t for t in trials if t["status"] == "ERROR"]
        for trial in failed:
            print(f"trial failed: {trial['trial']}: {trial['error']}", file=sys.stderr)
        for name in end_orphan_runs(tracking_uri, experiment, out, sweep_run.run_id):
            print(f"MLflow run {name!r} of a killed sweep ended KILLED (its trial ran again)", file=sys.stderr)
        summary = {"tracking_uri": tracking_uri, "experiment": experiment, "trials": len(results),
                   "failed_trials": len(failed), "trial_list": trials}
        if len(failed) == len(trials):
            (out / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            print(f"error: every trial failed (the first: {failed[0]['error']}); see {out / 'best.json'}",
                  file=sys.stderr)
            return 1
        best = results.get_best_result(metric="validation_mean", mode="max", scope="all", filter_nan_and_inf=True)
        tag_best(tracking_uri, experiment, best.metrics["trial_id"])
        best_run = Path(best.path) / "run"
        best_config = yaml.safe_load((best_run / "config.yaml").read_text())
        (out / "best_config.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False))
        summary = {"best_validation_mean": best.metrics["validation_mean"], "best_trial": Path(best.path).name,
                   "best_values": best.config, **summary}
        (out / "best.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        sweep_run.log_metrics({"validation_mean": best.metrics["validation_mean"], "trials": len(results),  # the best
                               "failed_trials": len(failed)}, step=0)
        sweep_run.set_tags({"best_trial": trial_name(best.config, best.metrics["trial_id"])})
        sweep_run.log_artifact(out / "best_config.yaml")
        print(json.dumps(summary, indent=2, default=str))
        print(f"Best config: {out / 'best_config.yaml'}  (train.py --config {out / 'best_config.yaml'})")
        if sweep_run.ui_link():
            print(f"MLflow runs: {sweep_run.ui_link()}")
        sweep_status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or slurm's SIGUSR1: Tune saved its state, the same command goes on
        sweep_status = "KILLED"
        raise
    except ConfigError as err:  # the cluster cannot place a trial
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sweep_run.finish(sweep_status)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
