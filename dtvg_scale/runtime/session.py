"""What every run of a job shares, whatever the method: the frozen backbone, loaded once per ZeRO
partitioning (every run's engine wraps it), the tasks' splits tokenised once, ``P_init`` (drawn
from the backbone's embedding rows, written once and checked on every later run), and how one run
is specified, trained, tracked as an MLflow run and skipped when it is done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from dtvg_scale.data import tasks
from dtvg_scale.data.encoding import encode_examples, encode_targets
from dtvg_scale.data.examples import TaskData
from dtvg_scale.data.options import DataArgs
from dtvg_scale.method.prompts import sample_init_prompt
from dtvg_scale.outputs.tracking import log_run_files, make_tracker, result_columns
from dtvg_scale.runtime.backbone import Backbone, PromptedModel, load_backbone, read_embedding_rows
from dtvg_scale.runtime.checkpoint import load_tensors, save_tensors
from dtvg_scale.runtime.distributed import DistContext, barrier
from dtvg_scale.runtime.ds_config import resolve_ds_config
from dtvg_scale.runtime.engine import build_engine
from dtvg_scale.runtime.loop import PromptRun, RunSpec, RunStopped, StepRecorder
from dtvg_scale.runtime.options import LoopArgs, PromptArgs, RunArgs


class StageError(ValueError):
    """Earlier outputs of this job that cannot be used (missing, or from another backbone or P_init)."""


class Session:
    """The shared state of one job's runs (``recipes.pipeline.Pipeline`` makes one)."""

    def __init__(self, ctx: DistContext, out: Path, raw_ds_config: dict, model_path: str, model_name: str,
                 dtype: torch.dtype, largest_trainable: int, hidden_size: int, prompt: PromptArgs, data: DataArgs,
                 run: RunArgs, splits: dict[str, TaskData],
                 on_evaluate: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.ctx, self.out, self.raw_ds_config = ctx, out, raw_ds_config
        self.model_path, self.model_name, self.dtype = model_path, model_name, dtype
        self.largest_trainable = largest_trainable  # ZeRO-3 keeps tensors up to this size whole on every rank
        self.hidden_size = hidden_size
        self.prompt_args, self.data, self.run, self.splits = prompt, data, run, splits
        self.on_evaluate = on_evaluate
        self.parent_run_id: str | None = None  # the job's MLflow run: every run here is its child
        self._encoded: dict[str, Any] = {}
        self._backbones: dict[str, Backbone] = {}

    def ds_config(self, loop: LoopArgs) -> dict:
        """The DeepSpeed config of a run with ``loop``."""
        return resolve_ds_config(self.raw_ds_config, loop, self.ctx.world_size, self.dtype, self.largest_trainable)

    def load(self, loop: LoopArgs) -> tuple[Backbone, dict]:
        """The frozen backbone and the DeepSpeed config of a run with ``loop``. The backbone is
        loaded once per partitioning: every run's engine wraps the same frozen module (each
        engine removes its ZeRO-3 hooks when destroyed), which saves a whole load per run."""
        ds_config = self.ds_config(loop)
        key = json.dumps(ds_config.get("zero_optimization", {}), sort_keys=True)
        if key not in self._backbones:
            self._backbones[key] = load_backbone(self.model_path, self.model_name, ds_config, self.dtype)
        return self._backbones[key], ds_config

    def examples(self, task: str, backbone: Backbone) -> tuple:
        """The task's splits, raw and tokenised (once per task)."""
        if task not in self._encoded:
            splits = self.splits[task]
            encode = lambda rows: encode_examples(  # noqa: E731
                rows, backbone.tokenizer, backbone.is_encoder_decoder,
                self.data.max_source_length, self.data.max_target_length,
            )
            self._encoded[task] = (splits, encode(splits.train), encode(splits.validation), encode(splits.test))
        return self._encoded[task]

    def label_ids(self, task: str, backbone: Backbone) -> tuple[tuple[int, ...], ...]:
        """eval_mode=likelihood: the task's class labels as training tokenises targets."""
        if self.data.eval_mode != "likelihood":
            return ()
        return tuple(encode_targets(self.splits[task].labels, backbone.tokenizer, backbone.is_encoder_decoder,
                                    self.data.max_target_length))

    def init_prompt(self, backbone: Backbone) -> torch.Tensor:
        """P_init: drawn from the (gathered) embedding table by every run and written once. A run
        that finds it on disk checks that the backbone still gives the same rows, so a backbone
        rebuilt or replaced under the same name cannot mix with Stage-I vectors of the old one."""
        p = self.prompt_args
        rows = read_embedding_rows(  # a collective under ZeRO-3: every rank, every run
            backbone.model, lambda w: sample_init_prompt(w, p.length, p.init_vocab_limit, p.init_seed)
        ).float().cpu()
        path = self.out / "init_prompt.safetensors"
        exists = path.exists()
        barrier()  # every rank has looked before rank 0 may write: all take the same branch
        if not exists:
            if self.ctx.is_main:
                save_tensors(path, {"init_prompt": rows}, self.fingerprint())
            barrier()
        tensors, meta = load_tensors(path)
        if meta != self.fingerprint():
            raise StageError(f"{path} was drawn for {meta}, but this run asks for {self.fingerprint()}; "
                             f"use another run.output_dir")
        if not torch.equal(tensors["init_prompt"], rows):
            raise StageError(f"the backbone {self.model_name!r} has changed since {path} was drawn (its "
                             f"embedding rows differ), so this run's earlier outputs belong to another model; "
                             f"use another run.output_dir")
        return tensors["init_prompt"]

    def fingerprint(self) -> dict[str, Any]:
        p = self.prompt_args
        return {"backbone": self.model_name, "hidden_size": self.hidden_size,
                "length": p.length, "init_seed": p.init_seed, "init_vocab_limit": p.init_vocab_limit}

    def spec(self, name: str, out_dir: Path, loop: LoopArgs, task: str, backbone: Backbone,
             recorder: StepRecorder | None = None) -> RunSpec:
        """One run of ``task``: its examples, scorer, evaluation mode and the job's run options."""
        splits, train, validation, test = self.examples(task, backbone)
        run = self.run
        return RunSpec(name=name, out_dir=out_dir, loop=loop, train=train, validation=validation, test=test,
                       validation_examples=splits.validation, test_examples=splits.test,
                       scorer=tasks.scorer(task), reported_metric=tasks.reported_metric(task),
                       max_new_tokens=self.data.max_target_length, seed=run.seed, recorder=recorder,
                       keep_checkpoints=run.keep_checkpoints, resume=run.resume,
                       check_rank_agreement=run.check_rank_agreement, progress=run.progress,
                       stop_after=run.stop_after, on_evaluate=self.on_evaluate, eval_mode=self.data.eval_mode,
                       labels=tuple(splits.labels or ()) if self.data.eval_mode == "likelihood" else (),
                       label_ids=self.label_ids(task, backbone))

    def train(self, backbone: Backbone, ds_config: dict, module: torch.nn.Module, groups: list[dict],
              loop: LoopArgs, spec: RunSpec, params: dict[str, str], prepare: Callable[[Any], None] | None = None,
              **artifacts: Any) -> dict[str, Any]:
        """Train ``module`` on the frozen backbone, tracked as a run with ``params`` (flattened
        options); ``prepare(engine)`` runs first (on every rank: a forward through a ZeRO-3 engine
        is a collective)."""
        prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
        engine = build_engine(prompted, groups, loop, ds_config, loop.weight_decay)
        run = self.run
        tracker = make_tracker(run.tracking, run.tracking_uri, run.experiment, self.out.parent, self.ctx.is_main)
        stage, _, name = spec.name.partition("/")
        tracker.start(f"{Path(run.output_dir).name}/{spec.name}", params,
                      tags={"stage": stage, "run": name, "target": self.data.target, "output_dir": str(self.out)},
                      parent_run_id=self.parent_run_id)
        status = "FAILED"
        try:
            if prepare is not None:
                prepare(engine)
            result = PromptRun(self.ctx, backbone, engine, spec, tracker=tracker, **artifacts).train()
            metrics, tags = result_columns(result)
            tracker.log_metrics(metrics, step=result["steps"])
            tracker.set_tags(tags)
            status = "FINISHED"
            return result
        except RunStopped:
            status = "KILLED"
            raise
        finally:
            engine.destroy()  # releases ZeRO-3 hooks; without it teardown can abort
            if self.ctx.is_main:
                log_run_files(tracker, spec.out_dir, {"ds_config.resolved.json": ds_config})
            tracker.finish(status)

    @staticmethod
    def done(out_dir: Path) -> dict[str, Any] | None:
        """A finished run's result (its ``result.json`` is written last), else None."""
        result = out_dir / "result.json"
        return json.loads(result.read_text()) if result.is_file() else None
