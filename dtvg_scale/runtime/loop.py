"""The training loop of one prompt module (progress, metrics, evaluation, checkpoints, stopping on
request), around the DeepSpeed engine of ``runtime.engine``. The loop knows
nothing of DTVG: a prompt module's forward returns its rows and a record of how it built them,
which the run's ``StepRecorder`` turns into a file of rows and tracked values.

One ``PromptRun`` trains one prompt module (a Stage-I prompt or a Stage-II strategy) and writes
everything it produces below its own folder:

- ``metrics.jsonl``: step, loss, lr, and validation scores at evaluation steps;
- the recorder's file (Stage II: ``group_trace.jsonl``, every step's similarities, KC and group);
- ``best_prompt.safetensors``: the best-validation prompt (P* or P_mix), frozen;
- ``test_predictions.jsonl``: input, target and generated text of every test example (best prompt);
- ``checkpoints/``: DeepSpeed checkpoints in safetensors (trainable state, optimizer, step);
- ``result.json``: validation and test scores of the best prompt and the recorder's entry for it
  (Stage II: ``group_at_best``), written last: a run with a result is complete and is skipped
  when the job is started again.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dtvg_scale.data.encoding import EncodedExample, collate_train
from dtvg_scale.data.metrics import Scorer, accuracy_scorer
from dtvg_scale.outputs.tracking import Tracker
from dtvg_scale.runtime.backbone import Backbone, PromptedModel, held_bytes
from dtvg_scale.runtime.checkpoint import (checkpoint_tags, file_record, save_tensors, set_aside, trusted_tag,
                                           write_manifest)
from dtvg_scale.runtime.distributed import DistContext, all_ranks_equal, barrier, from_main, gather_to_main
from dtvg_scale.runtime.engine import ds_stage, gathered_prompt
from dtvg_scale.runtime.evaluation import generate_predictions, likelihood_predictions
from dtvg_scale.runtime.options import LoopArgs
from dtvg_scale.runtime.progress import Progress
from dtvg_scale.runtime.sampling import global_batch_indices, rank_micro_batches


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ranks that disagree)."""


class RunStopped(RuntimeError):
    """Training stopped early on request (SIGTERM or run.stop_after), after a checkpoint."""


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (what slurm sends before a time limit or preemption): the loop
    checkpoints at the end of the current step and stops, instead of dying mid-step."""

    requested = False
    steps_done = 0  # optimizer steps taken by this process, over all runs

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):  # noqa: ARG001
            cls.requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)


_STOP = _StopFlag
install_stop_handlers = _StopFlag.install


class StepRecorder(Protocol):
    """What to do with the record a prompt module's ``forward()`` returns beside its rows (Stage
    II: DTVG's grouping decision, ``group_trace.GroupTraceRecorder``). The loop buffers the records
    on the device, hands them back here and writes what it gets: it never looks inside one."""

    file_name: str  # the JSONL file of the rows, in the run folder
    result_key: str  # result.json's key for what ``at_best`` makes of the best prompt's record

    def agreement(self, record: Any) -> Tensor:
        """What every rank must hold equal (``run.check_rank_agreement``)."""

    def rows(self, steps: list[int], records: list[Any]) -> list[dict[str, Any]]:
        """The file's rows for these steps (one host transfer for all of them)."""

    def metrics(self, row: dict[str, Any]) -> dict[str, float]:
        """One row's values for the tracker."""

    def at_best(self, record: Any) -> Any:
        """What result.json keeps (JSON) of the record of the prompt that scored best."""

    def module_metrics(self, module: nn.Module) -> dict[str, float]:
        """The prompt module's own state for the tracker (its parameters gathered)."""


@dataclass
class RunSpec:
    """What one run trains on and where it writes."""

    name: str
    out_dir: Path
    loop: LoopArgs
    train: list[EncodedExample]
    validation: list[EncodedExample]
    test: list[EncodedExample]
    max_new_tokens: int
    validation_examples: Sequence  # the raw examples (what the scorer compares predictions with)
    test_examples: Sequence
    seed: int
    scorer: Scorer = accuracy_scorer  # predictions -> metrics; the best prompt maximises "mean"
    reported_metric: str = "accuracy"
    recorder: StepRecorder | None = None  # what to make of the prompt module's per-step records
    keep_checkpoints: int = 2
    resume: bool = True
    check_rank_agreement: bool = False
    progress: bool = True
    stop_after: int | None = None  # optimizer steps in this invocation before a checkpoint and a stop
    # called on every rank after each validation (and its checkpoint): (step, validation scores,
    # the same on all ranks); a sweep reports to its scheduler here, which may stop the run
    on_evaluate: Callable[[int, dict[str, float]], None] | None = None
    # eval_mode "likelihood": predict the label (of ``labels``, tokenised as ``label_ids``) with the lowest loss
    eval_mode: str = "generate"
    labels: tuple[str, ...] = ()
    label_ids: tuple[tuple[int, ...], ...] = ()


def saved_at_best(client_state: dict[str, Any], recorder: StepRecorder | None) -> dict[str, Any]:
    """The recorder's result entry a checkpoint holds. Checkpoints written before 2026-12 held
    Stage II's group as ``best_group``: read as that recorder's entry, so such runs resume."""
    if client_state.get("best_group") is not None and recorder is not None:
        return {recorder.result_key: client_state["best_group"]}
    return dict(client_state.get("at_best", {}))


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(f"{line}\n" for line in kept))


class PromptRun:
    def __init__(self, ctx: DistContext, backbone: Backbone, engine, spec: RunSpec,
                 artifact_extra: Callable[[Tensor], dict[str, Tensor]] | None = None,
                 artifact_meta: dict[str, Any] | None = None, tracker: Tracker | None = None) -> None:
        self.ctx = ctx
        self.tracker = tracker or Tracker()
        self.backbone = backbone
        self.engine = engine
        self.spec = spec
        self.prompted: PromptedModel = engine.module
        self.synced_generation = ds_stage(engine) == 3 and ctx.world_size > 1
        self.artifact_extra = artifact_extra
        self.artifact_meta = artifact_meta or {}
        self.checkpoint_dir = spec.out_dir / "checkpoints"
        self.metrics_path = spec.out_dir / "metrics.jsonl"
        self.records_path = spec.out_dir / spec.recorder.file_name if spec.recorder else None
        self.best_score = -math.inf
        self.best_scores: dict[str, float] = {}
        self.best_step = -1
        self.best_prompt: Tensor | None = None
        self.at_best: dict[str, Any] = {}  # the recorder's result entry for the best prompt
        self.pending_metrics: list[dict] = []
        self.pending_records: list[tuple[int, Any]] = []  # (step, record): kept on the device until a flush
        self.sharding = self._sharding()

    def _sharding(self) -> dict[str, Any]:
        """What share of the frozen backbone each rank holds (ZeRO-3 partitions it; else whole)."""
        held, total = held_bytes(self.backbone.model)
        per_rank: list = [held]
        if self.ctx.world_size > 1:
            per_rank = [None] * self.ctx.world_size
            dist.all_gather_object(per_rank, held)
        return {"backbone_bytes": total, "held_bytes_per_rank": per_rank}

    # -- small helpers
    def _write_jsonl(self, path: Path, rows: list[dict]) -> None:
        if self.ctx.is_main and rows:
            with path.open("a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)

    def _flush(self) -> None:
        """Write buffered metrics and records. The records stay on the device until here: one
        transfer per log interval instead of a host sync every step."""
        recorder = self.spec.recorder
        if self.pending_records and recorder is not None:
            rows = recorder.rows([s for s, _ in self.pending_records], [r for _, r in self.pending_records])
            self._write_jsonl(self.records_path, rows)
            for row in rows:
                self.tracker.log_metrics(recorder.metrics(row), step=row["step"])
        self.pending_records.clear()
        self._write_jsonl(self.metrics_path, self.pending_metrics)
        for row in self.pending_metrics:
            flat = {k: v for k, v in row.items() if k not in ("step", "validation")}
            flat.update({f"validation_{k}": v for k, v in row.get("validation", {}).items()})
            self.tracker.log_metrics(flat, step=row["step"])
        if self.pending_metrics and recorder is not None:
            # the prompt module's state as it is now (e.g. DTVG's scale norms): one read per log
            # interval, on every rank (gathering is a collective under ZeRO-3; only rank 0 tracks)
            params = list(self.prompted.prompt.parameters())
            with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                values = recorder.module_metrics(self.prompted.prompt)
            self.tracker.log_metrics(values, step=self.pending_metrics[-1]["step"])
        self.pending_metrics.clear()

    def _score(self, prompt_rows: Tensor, encoded: list[EncodedExample], raw: Sequence,
               save_as: Path | None = None) -> dict[str, float]:
        if self.spec.eval_mode == "likelihood":
            predictions = likelihood_predictions(self.prompted, prompt_rows, encoded, self.spec.label_ids,
                                                 self.spec.labels, self.backbone.tokenizer.pad_token_id,
                                                 self.spec.loop.eval_batch_size, self.ctx.rank, self.ctx.world_size)
        else:
            predictions = generate_predictions(self.prompted, prompt_rows, encoded, self.backbone.tokenizer,
                                               self.spec.loop.eval_batch_size, self.spec.max_new_tokens,
                                               self.ctx.rank, self.ctx.world_size, self.synced_generation)
        if save_as is not None and self.ctx.is_main:  # so "always one label" can be told from "not a label"
            rows = [{"input": e.source, "target": e.target, "prediction": pred} for e, pred in zip(raw, predictions)]
            save_as.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return self.spec.scorer(predictions, raw)

    def _save_checkpoint(self, step: int) -> None:
        tag = f"step{step}"
        tag_dir = self.checkpoint_dir / tag
        client_state = {"step": step, "best_score": self.best_score, "best_scores": self.best_scores,
                        "best_step": self.best_step, "best_prompt": self.best_prompt, "at_best": self.at_best}
        writer = self.engine.checkpoint_engine
        writer.written.clear()
        try:  # save_latest=False: a tag is trusted by its manifest, written below once every rank has written
            self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state,
                                        exclude_frozen_parameters=True, save_latest=False)
            records = gather_to_main([file_record(path, tag_dir) for path in writer.written])
            if self.ctx.is_main:
                write_manifest(tag_dir, [record for rank in records for record in rank])
        except BaseException:
            if self.ctx.is_main:  # never leave a half-written checkpoint behind
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise
        barrier()
        if self.ctx.is_main:
            # DeepSpeed copies its zero_to_fp32.py / zero_to_torch.py beside ZeRO checkpoints; they read
            # pickle files and would fail on ours (safetensors), and the frozen backbone is not in them
            # anyway: the trained prompt is best_prompt/last_prompt.safetensors
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (self.checkpoint_dir / script).unlink(missing_ok=True)
            for old in checkpoint_tags(self.checkpoint_dir)[: -self.spec.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def _try_resume(self) -> int:
        """Resume from the newest complete checkpoint (``checkpoint.trusted_tag``); a newer one that is
        incomplete or damaged is named, set aside and skipped; none complete while some exist stops the run."""
        if not (self.spec.resume and self.checkpoint_dir.is_dir()):
            return 0
        tag, problems = from_main(trusted_tag(self.checkpoint_dir) if self.ctx.is_main else None)
        if tag is None and not problems:
            return 0
        if tag is None:
            raise TrainingError(f"{self.spec.name}: no complete checkpoint to resume from: {'; '.join(problems)}. "
                                f"Move {self.checkpoint_dir} away to start this run over")
        if self.ctx.is_main:
            for problem in problems:
                print(f"warning: {self.spec.name}: {problem}; resuming from {tag}, the newest complete checkpoint",
                      file=sys.stderr, flush=True)
            for damaged in checkpoint_tags(self.checkpoint_dir):
                if int(damaged.name.removeprefix("step")) > int(tag.removeprefix("step")):
                    set_aside(self.checkpoint_dir, damaged.name)
        barrier()
        _, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag, load_module_strict=False)
        if client_state is None:
            raise TrainingError(f"checkpoint {self.checkpoint_dir / tag} could not be loaded")
        step = int(client_state["step"])
        self.best_score, self.best_step = client_state["best_score"], client_state["best_step"]
        self.best_scores = dict(client_state["best_scores"])
        self.best_prompt = client_state["best_prompt"]
        self.at_best = saved_at_best(client_state, self.spec.recorder)
        if self.ctx.is_main:
            _truncate_jsonl(self.metrics_path, step)
            if self.records_path is not None:
                _truncate_jsonl(self.records_path, step)
        return step + 1

    def _save_best(self) -> None:
        if self.ctx.is_main and self.best_prompt is not None:
            extra = self.artifact_extra(self.best_prompt) if self.artifact_extra else {}
            meta = {**self.artifact_meta, "run": self.spec.name, "best_step": self.best_step,
                    "validation": self.best_scores}
            save_tensors(self.spec.out_dir / "best_prompt.safetensors", {"prompt": self.best_prompt, **extra}, meta)

    # -- the loop
    def train(self) -> dict[str, Any]:
        spec, ctx, loop = self.spec, self.ctx, self.spec.loop
        if ctx.is_main:
            spec.out_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        start = self._try_resume()
        if start == 0 and ctx.is_main:
            for path in (self.metrics_path, self.records_path):
                if path is not None:
                    path.unlink(missing_ok=True)
        pad_id = self.backbone.tokenizer.pad_token_id
        progress = Progress(spec.name, loop.steps, start, enabled=ctx.is_main and spec.progress)
        self.engine.train()
        for step in range(start, loop.steps):
            # 1) the same global batch on every rank, each takes its slice; dropout seeded per
            #    (step, rank) so a resumed run draws what the uninterrupted one would have.
            torch.manual_seed(spec.seed * 1_000_003 + step * ctx.world_size + ctx.rank)
            indices = global_batch_indices(len(spec.train), loop.batch_size, step, spec.seed)
            step_loss = torch.zeros((), device=ctx.device, dtype=torch.float32)
            record = None  # the prompt module's record of this step (Stage II: the group decision)
            for micro in rank_micro_batches(indices, ctx.rank, ctx.world_size, loop.gradient_accumulation_steps):
                batch = collate_train([spec.train[i] for i in micro], pad_id, self.prompted.is_encoder_decoder)
                loss, micro_record = self.engine(**{k: v.to(ctx.device) for k, v in batch.items()})
                self.engine.backward(loss)
                self.engine.step()
                step_loss += loss.detach().float() / loop.gradient_accumulation_steps
                record = record if record is not None else micro_record
            # 2) one all-reduce of the loss and of "asked to stop" (SIGTERM, stop_after): every
            #    rank sees the same values, so a NaN or a stop request stops all of them together.
            _STOP.steps_done += 1
            asked_to_stop = _STOP.requested or (spec.stop_after is not None and _STOP.steps_done >= spec.stop_after)
            shared = torch.stack([step_loss, torch.tensor(float(asked_to_stop), device=step_loss.device)])
            if ctx.world_size > 1:
                dist.all_reduce(shared)
            mean_loss, stop_now = (shared / torch.tensor([ctx.world_size, 1.0], device=shared.device)).tolist()
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"{spec.name}: loss is {mean_loss} at step {step}; stopping without a checkpoint "
                    f"(the last good one is in {self.checkpoint_dir}). Lower the learning rate or use fp32."
                )
            if record is not None and spec.recorder is not None:
                if spec.check_rank_agreement and not all_ranks_equal(spec.recorder.agreement(record)):
                    raise TrainingError(f"{spec.name}: ranks took different decisions at step {step}")
                self.pending_records.append((step, record))
            lr = self.engine.get_lr()[0]
            self.pending_metrics.append({"step": step, "loss": mean_loss, "lr": lr})
            progress.step(step, mean_loss, self.best_score)
            # 3) validate + checkpoint, and write what is buffered
            last = step == loop.steps - 1
            if (step + 1) % loop.eval_every == 0 or last:
                rows, record_of_rows = gathered_prompt(self.prompted)
                scores = self._score(rows, spec.validation, spec.validation_examples)
                self.pending_metrics.append({"step": step, "validation": scores})
                if scores["mean"] > self.best_score:
                    self.best_score, self.best_scores = scores["mean"], scores
                    self.best_step, self.best_prompt = step, rows
                    if record_of_rows is not None and spec.recorder is not None:  # e.g. the group inside P_mix
                        self.at_best = {spec.recorder.result_key: spec.recorder.at_best(record_of_rows)}
                progress.evaluated(step, scores["mean"], self.best_score)
                self._flush()
                self._save_checkpoint(step)
                self._save_best()
                if spec.on_evaluate is not None:  # on every rank: a multi-rank reporter is a collective
                    spec.on_evaluate(step, scores)
            elif stop_now:
                self._flush()
                self._save_checkpoint(step)
            elif (step + 1) % loop.log_every == 0:
                self._flush()
            if stop_now and not last:
                progress.close()
                raise RunStopped(f"{spec.name}: stopped after step {step} with a checkpoint in {self.checkpoint_dir}; "
                                 f"run the same command again to continue")
        progress.close()
        return self._finish()

    def score_only(self, prompt_rows: Tensor) -> dict[str, Any]:
        """Validation and test scores of a fixed prompt, no training (``prompt_rows`` may have no
        rows: the backbone's zero-shot score with the task's template alone)."""
        if self.ctx.is_main:
            self.spec.out_dir.mkdir(parents=True, exist_ok=True)
        validation = self._score(prompt_rows, self.spec.validation, self.spec.validation_examples)
        test = self._score(prompt_rows, self.spec.test, self.spec.test_examples,
                           save_as=self.spec.out_dir / "test_predictions.jsonl")
        result = {"run": self.spec.name, "best_step": None, "steps": 0, "prompt_rows": int(prompt_rows.shape[0]),
                  "reported_metric": self.spec.reported_metric, "eval_mode": self.spec.eval_mode,
                  "validation": validation, "test": test, "sharding": self.sharding,
                  "examples": {"validation": len(self.spec.validation), "test": len(self.spec.test)}}
        if self.ctx.is_main:
            (self.spec.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        barrier()
        return result

    def _finish(self) -> dict[str, Any]:
        last_prompt, _ = gathered_prompt(self.prompted)
        if self.ctx.is_main:
            save_tensors(self.spec.out_dir / "last_prompt.safetensors", {"prompt": last_prompt},
                         {**self.artifact_meta, "run": self.spec.name, "step": self.spec.loop.steps - 1})
        test = (self._score(self.best_prompt.to(self.ctx.device), self.spec.test, self.spec.test_examples,
                            save_as=self.spec.out_dir / "test_predictions.jsonl")
                if self.spec.test else None)  # a source has no test split: nothing scores it there
        result = {"run": self.spec.name, "best_step": self.best_step, "steps": self.spec.loop.steps,
                  "reported_metric": self.spec.reported_metric, "eval_mode": self.spec.eval_mode,
                  "validation": self.best_scores, "test": test, "sharding": self.sharding,
                  **self.at_best,
                  "examples": {"train": len(self.spec.train), "validation": len(self.spec.validation),
                               "test": len(self.spec.test)}}
        if self.ctx.is_main:
            (self.spec.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        barrier()
        return result
