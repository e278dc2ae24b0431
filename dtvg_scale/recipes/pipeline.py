"""Stage I (a plain prompt per task) and Stage II (the target with DTVG or an ablation).

Run directory layout::

    <output_dir>/config.yaml, ds_config.json      resolved options
    <output_dir>/backbone.json                     the model folder (or hub name) loaded
    <output_dir>/data.json                         per task: role, examples per split, split overrides
    <output_dir>/init_prompt.safetensors           P_init, shared by every task
    <output_dir>/stage1/<task>/                    best_prompt.safetensors (prompt, task_vector), metrics
    <output_dir>/stage2/<strategy>/                best_prompt.safetensors (P_mix), metrics, group trace
                                                   (<strategy> may carry a preset: dtvg-transfer)
    <output_dir>/results.json                      the summary

The backbone is loaded once (ZeRO-3 partitions it as it loads) and every run's engine wraps it;
a run is skipped when its ``result.json`` exists, so a job that died is started again with the
same command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import torch

from dtvg_scale.data import controlled, tasks
from dtvg_scale.data.task_files import register_task_files
from dtvg_scale.method.config import PRESETS, split_strategy
from dtvg_scale.method.prompts import DTVGPrompt, SoftPrompt
from dtvg_scale.method.strategies import spot_source
from dtvg_scale.method.transfer import transfer_gains
from dtvg_scale.outputs import group_trace
from dtvg_scale.outputs.tracking import flatten
from dtvg_scale.recipes.config import Config, ConfigError, LoopArgs, Stage2Args
from dtvg_scale.runtime.backbone import (CONTROLLED_PREFIX, PromptedModel, check_prompt_fits, hidden_size,
                                         is_decoder_only, resolve_model_path)
from dtvg_scale.runtime.checkpoint import load_tensors
from dtvg_scale.runtime.distributed import DistContext, barrier, on_main_then_all
from dtvg_scale.runtime.ds_config import resolve_precision
from dtvg_scale.runtime.engine import build_engine, optimizer_groups
from dtvg_scale.runtime.loop import PromptRun, RunSpec
from dtvg_scale.runtime.session import Session, StageError
from dtvg_scale.runtime.transfer_losses import target_losses


class Pipeline:
    """One job: its tasks and backbone checked and loaded (before any training), then the zero-shot
    score, Stage I and Stage II, each run through the job's ``Session`` (``runtime/session.py``)."""

    def __init__(self, ctx: DistContext, cfg: Config, raw_ds_config: dict,
                 on_evaluate: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.stage1_dir = Path(cfg.run.stage1_dir) if cfg.run.stage1_dir else self.out / "stage1"
        self.dtype = resolve_precision(cfg.model.precision)
        register_task_files(cfg.data.task_files)  # the user's own tasks, before any name is checked
        task_names = [cfg.data.target, *cfg.data.sources]
        tasks.check_tasks(task_names)
        if cfg.data.target in cfg.data.sources:
            raise ConfigError(f"the target {cfg.data.target!r} is also listed as a source")
        if cfg.model.name_or_path.startswith(CONTROLLED_PREFIX):
            foreign = [name for name in task_names if name not in controlled.CONTROLLED_TASKS]
            if foreign:  # its word-level vocabulary is the controlled world's: any other text is all unknown
                raise ConfigError(f"{cfg.model.name_or_path} knows the controlled world's tasks only "
                                  f"({', '.join(controlled.CONTROLLED_TASKS)}), not {foreign[0]!r}")
        if len(set(cfg.data.sources)) != len(cfg.data.sources):
            raise ConfigError(f"a source is listed twice: {cfg.data.sources}")
        unknown = set(cfg.data.overrides_by_task()) - set(task_names)
        if unknown:
            raise ConfigError(f"data.split_overrides names {', '.join(sorted(unknown))}, not a task of this run")
        # 1) every task's data now, so a missing split stops the job before any training; a
        #    source's test split is never read (nothing scores a source on it), and k_shot is the
        #    target's (sources train on their full data, as in the paper's few-shot runs)
        self.decoder_only = on_main_then_all(lambda: is_decoder_only(cfg.model.name_or_path))
        self.splits = {name: tasks.load_task(name, cfg.data, self.decoder_only,
                                             role="target" if name == cfg.data.target else "source")
                       for name in task_names}
        if cfg.data.eval_mode == "likelihood":
            generative = [name for name in task_names if not self.splits[name].labels]
            if generative:
                raise ConfigError(f"data.eval_mode=likelihood scores class labels, and {generative[0]!r} has none "
                                  f"(a generative task); use data.eval_mode=generate")
        # 2) the backbone folder: rank 0 builds (embedded) or checks it, then everyone resolves it
        corpus = None
        if cfg.model.name_or_path.startswith("embedded:") and not all(tasks.is_embedded(n) for n in task_names):
            # sorted: every run over the same tasks gets the same tokenizer, whichever is the target
            corpus = [text for name in sorted(task_names) for e in self.splits[name].train for text in (e.source, e.target)]
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "data.json").write_text(json.dumps(self._data_record(), indent=2) + "\n")
        self.model_path = on_main_then_all(lambda: resolve_model_path(
            cfg.model.name_or_path, self.out.parent / ".backbones", cfg.model.embedded_d_model,
            cfg.model.embedded_layers, corpus,
        ))
        if ctx.is_main:  # what an exported prompt's base model is (dtvg-export)
            local = Path(self.model_path).expanduser()
            recorded = str(local.resolve()) if local.exists() else self.model_path  # else a hub name
            (self.out / "backbone.json").write_text(json.dumps(
                {"name_or_path": cfg.model.name_or_path, "model_path": recorded}, indent=2) + "\n")
        self.hidden_size = hidden_size(self.model_path)
        check_prompt_fits(self.model_path, cfg.prompt.length, cfg.prompt.init_vocab_limit)
        # the largest trainable tensor (the prompt, or the sources' scales): ZeRO-3 keeps it whole on every rank
        largest = max(cfg.prompt.length * self.hidden_size, len(cfg.data.sources) * cfg.prompt.length)
        self.session = Session(ctx, self.out, raw_ds_config, self.model_path, cfg.model.name_or_path, self.dtype,
                               largest, self.hidden_size, cfg.prompt, cfg.data, cfg.run, self.splits, on_evaluate)

    def _data_record(self) -> dict[str, Any]:
        """What each task's splits really held (subsets and caps included) and any protocol departure."""
        record = {}
        for name, splits in self.splits.items():
            examples = {split: len(getattr(splits, split)) for split in ("train", "validation", "test")}
            record[name] = {"role": "target" if name == self.cfg.data.target else "source", "examples": examples,
                            "split_sizes": splits.split_sizes or examples,
                            "split_overrides": splits.split_overrides}
        return record

    def _params(self, loop: LoopArgs) -> dict[str, str]:
        """A run's options as tracked: the job's, with this run's own Stage-II knobs (a strategy's
        preset changes some)."""
        params = self.cfg.to_dict()
        if isinstance(loop, Stage2Args):
            params["stage2"] = dataclasses.asdict(loop)
        return flatten(params)

    # ------------------------------------------------------------ zero-shot
    def zero_shot(self) -> dict[str, Any]:
        """The target scored with no soft prompt (its template alone): the backbone's own score."""
        out_dir = self.out / "zero_shot"
        if self.cfg.run.resume and (done := self.session.done(out_dir)):
            return done
        loop = self.cfg.stage2
        backbone, ds_config = self.session.load(loop)
        p_init = self.session.init_prompt(backbone).to(self.ctx.device)
        module = SoftPrompt(p_init)  # an engine needs something to train; the scores use none of it
        groups = [{"params": [module.prompt], "lr": 0.0, "name": "prompt"}]
        engine = build_engine(PromptedModel(backbone.model, module, backbone.is_encoder_decoder), groups, loop,
                              ds_config, 0.0)
        try:
            spec = self.session.spec("zero_shot", out_dir, loop, self.cfg.data.target, backbone)
            return PromptRun(self.ctx, backbone, engine, spec).score_only(p_init.new_zeros(0, p_init.shape[1]))
        finally:
            engine.destroy()

    # ------------------------------------------------------------ Stage I
    def _stage1_run(self, task: str, out_dir: Path, seed_offset: int) -> dict[str, Any]:
        loop = self.cfg.stage1
        backbone, ds_config = self.session.load(loop)
        p_init = self.session.init_prompt(backbone).to(self.ctx.device)
        module = SoftPrompt(p_init)
        spec = self.session.spec(f"stage1/{task}", out_dir, loop, task, backbone)
        spec.seed += seed_offset
        groups = [{"params": [module.prompt], "lr": loop.lr, "name": "prompt"}]
        return self.session.train(
            backbone, ds_config, module, groups, loop, spec, self._params(loop),
            artifact_extra=lambda best, p=p_init: {"task_vector": best.float() - p.float().cpu(),
                                                   "init_prompt": p.float().cpu()},
            artifact_meta={**self.session.fingerprint(), "task": task},
        )

    def stage1(self) -> dict[str, Any]:
        """A prompt per task. With ``stage1.min_score``, a source whose best validation score
        stays below it is retrained with another seed (``stage1.gate_retries`` times; the
        rejected attempt is kept as ``<task>.attempt<N>``) and then excluded from Stage II; the
        decisions go to ``stage1/gate.json``."""
        results, gate = {}, self._read_gate()
        min_score = self.cfg.stage1.min_score
        for task in [self.cfg.data.target, *self.cfg.data.sources]:
            out_dir = self.stage1_dir / task
            result = (self.cfg.run.resume and self.session.done(out_dir)) or self._stage1_run(task, out_dir, 0)
            if min_score is not None and task != self.cfg.data.target and task not in gate:
                scores = [result["validation"]["mean"]]
                while scores[-1] < min_score and len(scores) <= self.cfg.stage1.gate_retries:
                    if self.ctx.is_main:
                        out_dir.rename(out_dir.with_name(f"{task}.attempt{len(scores)}"))
                    barrier()
                    result = self._stage1_run(task, out_dir, seed_offset=1000 * len(scores))
                    scores.append(result["validation"]["mean"])
                gate[task] = {"validation_means": scores, "excluded": scores[-1] < min_score, "min_score": min_score}
                if self.ctx.is_main:
                    (self.stage1_dir / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")
            results[task] = {**result, **({"gate": gate[task]} if task in gate else {})}
        return results

    def _read_gate(self) -> dict[str, Any]:
        path = self.stage1_dir / "gate.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def stage2_sources(self) -> list[str]:
        """The sources Stage II merges: all, less those the Stage-I gate excluded."""
        excluded = {t for t, g in self._read_gate().items() if g["excluded"]}
        return [s for s in self.cfg.data.sources if s not in excluded]

    # ------------------------------------------------------------ Stage II
    def _stage1_vectors(self, p_init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target's Stage-I prompt and the sources' prompts and task vectors, checked to
        come from this backbone and this P_init."""
        def read(task: str) -> dict[str, torch.Tensor]:
            path = self.stage1_dir / task / "best_prompt.safetensors"
            if not path.is_file():
                raise StageError(f"no Stage-I prompt for task {task!r} at {path}; run Stage I first (run.stages=stage1)")
            tensors, meta = load_tensors(path)
            if "task_vector" not in tensors or "init_prompt" not in tensors:
                raise StageError(f"{path} is not a Stage-I output (no task_vector/init_prompt)")
            if tensors["task_vector"].shape != p_init.shape:
                raise StageError(
                    f"task vector of {task!r} has shape {tuple(tensors['task_vector'].shape)}, expected "
                    f"{tuple(p_init.shape)} (prompt length x hidden size of {self.cfg.model.name_or_path})"
                )
            if not torch.equal(tensors["init_prompt"], p_init.float().cpu()):
                raise StageError(
                    f"task vector of {task!r} was trained from another P_init (backbone {meta.get('backbone')!r}, "
                    f"init seed {meta.get('init_seed')}); every task must share this run's backbone and P_init"
                )
            return tensors

        target = read(self.cfg.data.target)
        sources = [read(s) for s in self.stage2_sources()]
        source_tvs = torch.stack([s["task_vector"] for s in sources]) if sources else p_init.new_zeros(0, *p_init.shape)
        source_prompts = torch.stack([s["prompt"] for s in sources]) if sources else source_tvs
        return target["prompt"], source_prompts, source_tvs

    def stage2(self) -> dict[str, Any]:
        results = {}
        cfg = self.cfg
        names = tuple(self.stage2_sources())
        for run_name in cfg.stage2.strategies:
            out_dir = self.out / "stage2" / run_name
            if cfg.run.resume and (done := self.session.done(out_dir)):
                results[run_name] = done
                continue
            strategy, preset = split_strategy(run_name)
            loop = cfg.stage2 if preset is None else dataclasses.replace(cfg.stage2, **PRESETS[preset])
            backbone, ds_config = self.session.load(loop)
            p_init = self.session.init_prompt(backbone).float()
            target_prompt, source_prompts, source_tvs = self._stage1_vectors(p_init)
            device = self.ctx.device
            if strategy == "spot":
                if not names:
                    raise StageError("SPoT needs at least one source, and no source is left for Stage II")
                picked = int(spot_source(target_prompt, source_prompts))
                module = SoftPrompt(p_init.to(device), start=source_prompts[picked].to(device))
                groups = [{"params": [module.prompt], "lr": loop.spot_lr, "name": "prompt"}]
                meta = {"strategy": strategy, "spot_source": names[picked]}
            else:
                module = DTVGPrompt(p_init.to(device), target_prompt.to(device), source_tvs.to(device),
                                    loop.dtvg_config(strategy))
                groups = optimizer_groups([("prompt", module.prompt, loop.prompt_lr),
                                           ("target_scale", module.target_scale, loop.target_scale_lr),
                                           ("source_scales", module.source_scales, loop.source_scale_lr)])
                meta = {"strategy": strategy, **({"preset": preset} if preset else {})}
            spec = self.session.spec(f"stage2/{run_name}", out_dir, loop, cfg.data.target, backbone,
                              recorder=group_trace.GroupTraceRecorder(names) if strategy != "spot" else None)
            prepare = None
            if strategy != "spot" and loop.ranking == "transfer":
                prepare = functools.partial(self._measure_transfer, loop=loop, spec=spec, names=names,
                                            pad_id=backbone.tokenizer.pad_token_id)
            results[run_name] = {**self.session.train(backbone, ds_config, module, groups, loop, spec, self._params(loop),
                                                      prepare=prepare,
                                                      artifact_meta={**self.session.fingerprint(), **meta}), **meta}
            if self.ctx.is_main:  # keep the strategy's facts (e.g. SPoT's source) for reruns that skip it
                (out_dir / "result.json").write_text(json.dumps(results[run_name], indent=2) + "\n")
        return results

    def _measure_transfer(self, engine, loop: LoopArgs, spec: RunSpec, names: tuple[str, ...], pad_id: int) -> None:
        """ranking=transfer: score every source's own prompt (P_init + T_k) and P_init on the
        target's first ``stage2.transfer_examples`` training examples, hand the gains to the DTVG
        prompt and write them to ``<run>/transfer.json``."""
        module: DTVGPrompt = engine.module.prompt
        prompts = module.transfer_prompts()
        examples = spec.train[: loop.transfer_examples]
        losses = target_losses(engine.module, prompts, examples, pad_id, loop.eval_batch_size,
                               self.ctx.rank, self.ctx.world_size)
        gains = transfer_gains(losses[0], losses[1:])
        module.set_transfer_gain(gains.to(prompts.device))
        if self.ctx.is_main:
            spec.out_dir.mkdir(parents=True, exist_ok=True)
            report = {"examples": len(examples), "init_loss": float(losses[0]),
                      "sources": {name: {"loss": float(loss), "gain": float(gain)}
                                  for name, loss, gain in zip(names, losses[1:], gains, strict=True)}}
            (spec.out_dir / "transfer.json").write_text(json.dumps(report, indent=2) + "\n")

