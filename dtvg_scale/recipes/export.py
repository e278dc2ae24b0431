"""A trained prompt as a Hugging Face PEFT prompt-tuning adapter, for serving without this package.

    dtvg-export runs/dtvg out/adapter                  # the target's best run
    dtvg-export runs/dtvg out/adapter --run stage2/dtvg
    dtvg-export runs/dtvg/stage2/dtvg out/adapter      # a run folder itself

The prompt exported is a run's ``best_prompt.safetensors``: for Stage II the merged prompt P_mix
the run evaluated with (no scale or source vector is needed any more), for Stage I the task's
P*. Given a job folder (the ``run.output_dir`` of ``train.py``) and no ``--run``, the target's run
with the best validation score is taken (Stage I prompt tuning or any Stage-II strategy) and named.

The out folder holds what ``PeftModel.from_pretrained(base_model, out)`` reads:

- ``adapter_config.json``: PEFT's ``PromptTuningConfig`` (``PROMPT_TUNING``; ``CAUSAL_LM`` or
  ``SEQ_2_SEQ_LM``; one transformer submodule, since this package prompts a T5's encoder only);
- ``adapter_model.safetensors``: ``prompt_embeddings``, [num_virtual_tokens, token_dim];
- ``dtvg_scale.json``: where it came from (run, scores) and how inputs were built (task, template
  example, input truncation, ``max_new_tokens``, labels), which PEFT's config has no place for.

Serving: load the base model (``base_model_name_or_path``), wrap it with
``PeftModel.from_pretrained``, tokenize the input text as the task formats it and ``generate``
greedily (decoder-only: pad on the left).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()  # the backbone module imports deepspeed: choose its accelerator first (no warning on CPU)

from dtvg_scale.recipes.config import ConfigError, load_config  # noqa: E402
from dtvg_scale.runtime.backbone import BackboneError, is_encoder_decoder_config, resolve_model_path  # noqa: E402
from dtvg_scale.runtime.checkpoint import load_tensors  # noqa: E402

PROMPT_FILE = "best_prompt.safetensors"
BACKBONE_RECORD = "backbone.json"  # written by the pipeline: the model folder every rank loaded


class ExportError(ValueError):
    """The folder given is not a finished run, or its backbone cannot be found."""


def find_run(given: Path, run: str | None) -> tuple[Path, Path]:
    """(job folder, run folder) for a job folder (+ optional run name) or a run folder."""
    if not given.is_dir():
        raise ExportError(f"{given} is not a folder")
    if (given / PROMPT_FILE).is_file():
        if run is not None:
            raise ExportError(f"{given} is a run folder already; --run {run} only applies to a job folder")
        job = given.parent.parent  # <job>/stage1|stage2/<name>
        if not (job / "config.yaml").is_file():
            raise ExportError(f"{given} has a prompt but {job} has no config.yaml: not a train.py output")
        return job, given
    if not (given / "config.yaml").is_file():
        raise ExportError(f"{given} is neither a train.py output folder (config.yaml) nor a run folder ({PROMPT_FILE})")
    if run is not None:
        folder = given / run
        if not (folder / PROMPT_FILE).is_file():
            found = ", ".join(candidate_runs(given)) or "none"
            raise ExportError(f"{folder} has no {PROMPT_FILE}; runs with a prompt here: {found}")
        return given, folder
    return given, given / best_target_run(given)


def candidate_runs(job: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(job)) for p in job.glob(f"stage[12]/*/{PROMPT_FILE}"))


def best_target_run(job: Path) -> str:
    """The target's finished run with the best validation mean (Stage-II strategies in name
    order, then the target's Stage I; the first of equals wins)."""
    target = load_config(str(job / "config.yaml"), [], check_paths=False).data.target
    names = sorted(p.parent.name for p in job.glob(f"stage2/*/{PROMPT_FILE}"))
    runs = [f"stage2/{name}" for name in names] + [f"stage1/{target}"]
    scored = []
    for name in runs:
        result = job / name / "result.json"
        if (job / name / PROMPT_FILE).is_file() and result.is_file():
            validation = json.loads(result.read_text()).get("validation") or {}
            scored.append((validation.get("mean", float("-inf")), name))
    if not scored:
        raise ExportError(f"{job} has no finished run of its target {target!r} (no result.json beside a prompt)")
    best = max(score for score, _ in scored)
    return next(name for score, name in scored if score == best)


def base_model_path(job: Path, name_or_path: str) -> str:
    """The model folder (or hub name) the run loaded: recorded by the pipeline, else resolved
    again where that needs no training data (hub names, folders, GGUF files)."""
    record = job / BACKBONE_RECORD
    if record.is_file():
        return json.loads(record.read_text())["model_path"]
    if name_or_path.startswith("embedded:"):
        raise ExportError(f"{job} has no {BACKBONE_RECORD} (written by train.py since the export exists) to say which "
                          f"embedded backbone folder it used; pass --base_model <that folder>")
    try:
        return resolve_model_path(name_or_path, job / ".backbones", 0, 0)
    except BackboneError as err:
        raise ExportError(f"cannot find the run's backbone: {err}; pass --base_model") from err


def export(given: Path, out: Path, run: str | None = None, base_model: str | None = None) -> dict[str, Any]:
    """Write the adapter folder (atomically: a half-written folder is never left at ``out``)."""
    from peft import PromptTuningConfig, TaskType
    from safetensors.torch import save_file

    job, run_dir = find_run(given, run)
    cfg = load_config(str(job / "config.yaml"), [], check_paths=False)  # its data folders may be elsewhere now
    model_path = base_model or base_model_path(job, cfg.model.name_or_path)
    try:
        encoder_decoder = is_encoder_decoder_config(model_path)
    except BackboneError as err:
        raise ExportError(str(err)) from err
    tensors, meta = load_tensors(run_dir / PROMPT_FILE)
    rows = tensors["prompt"]
    if rows.dim() != 2:
        raise ExportError(f"{run_dir / PROMPT_FILE} holds a prompt of shape {tuple(rows.shape)}, not [rows, width]")
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    run_name = str(run_dir.relative_to(job))
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM,
        num_virtual_tokens=int(rows.shape[0]),
        token_dim=int(rows.shape[1]),
        num_transformer_submodules=1,  # a T5 prompt is the encoder's only (PEFT's seq2seq default is 2)
        base_model_name_or_path=model_path,
        inference_mode=True,
    )
    task = meta.get("task") or cfg.data.target
    about = {
        "exported_from": str(run_dir.resolve()), "run": run_name, "task": task,
        "backbone": cfg.model.name_or_path, "base_model_name_or_path": model_path,
        "validation": result.get("validation"), "test": result.get("test"),
        "eval_mode": result.get("eval_mode", cfg.data.eval_mode),
        "inputs": {
            "max_source_length": cfg.data.max_source_length,
            "truncation": "keep the start" if encoder_decoder else "keep the end (bos first): the answer cue is last",
            "max_new_tokens": cfg.data.max_target_length,
            "padding_side": "right" if encoder_decoder else "left",
        },
        "example_input": _first_test_input(run_dir),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file({"prompt_embeddings": rows.contiguous()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "dtvg_scale.json").write_text(json.dumps(about, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return about


def _first_test_input(run_dir: Path) -> str | None:
    predictions = run_dir / "test_predictions.jsonl"
    if not predictions.is_file():
        return None
    with predictions.open() as handle:
        line = handle.readline()
    return json.loads(line)["input"] if line.strip() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path, help="train.py's run.output_dir, or one run in it (stage2/dtvg)")
    parser.add_argument("out_folder", type=Path, help="where the PEFT adapter is written (replaced if there)")
    parser.add_argument("--run", help="with a job folder: which run, e.g. stage2/dtvg or stage1/rte "
                                      "(default: the target's run with the best validation score)")
    parser.add_argument("--base_model", help="the backbone folder or hub name, if the job folder does not say it")
    args = parser.parse_args(argv)
    try:
        about = export(args.run_folder, args.out_folder, args.run, args.base_model)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    validation = (about["validation"] or {}).get("mean")
    test = (about["test"] or {}).get("mean")
    scores = ", ".join(f"{k} {v:.3f}" for k, v in (("validation", validation), ("test", test)) if v is not None)
    print(f"exported {about['run']} ({about['task']}{': ' + scores if scores else ''}) as a PEFT prompt-tuning "
          f"adapter: {args.out_folder}")
    print(f"base model: {about['base_model_name_or_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
