"""Bytes per checkpoint: what a resumable checkpoint of a prompt-tuning run costs on disk, per
DeepSpeed config, against the bytes of what really trains.

    .venv/bin/python benchmarks/checkpoint_bytes.py [--model smollm2] [--configs none zero2 zero3]

Each setting runs ``dtvg_scale/train.py`` for Stage I of one task, 2 steps, on 2 ranks through the
``deepspeed`` launcher (``none``: one process, ZeRO off), and reads the one checkpoint it keeps.
A checkpoint should hold the trainable state only: the prompt (r x d fp32), AdamW's two moments
of it, the scheduler and the loop's client state (the step, the best prompt so far). The frozen
backbone is never in it (``tests/test_cli.py`` checks that for every shipped config).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from dtvg_scale.runtime.distributed import free_port  # noqa: E402

PROMPT_LENGTH = 20


def model_and_task(model: str) -> tuple[list[str], int]:
    """(options naming the backbone and a task, the hidden size)."""
    if model == "smollm2":
        from dtvg_scale.recipes.fetch_model import fetch

        gguf, _ = fetch("smollm2-135m-instruct")
        data = ROOT.parent / "shared" / "data"
        return [f"model.name_or_path={gguf}", "data.target=sst2", f"data.local_dir={data}",
                "data.max_train_samples=64", "data.max_eval_samples=8", "data.max_source_length=32",
                "data.eval_mode=likelihood", "data.max_target_length=4"], 576
    return ["model.name_or_path=embedded:t5", "data.target=emb_target", "data.embedded_train_size=64",
            "data.embedded_eval_size=8", "data.max_target_length=4"], 64


def run(config: str, options: list[str], out: Path) -> None:
    common = [*options, "data.sources=[]", "run.stages=stage1", f"prompt.length={PROMPT_LENGTH}", "stage1.steps=2",
              "stage1.eval_every=2", "stage1.batch_size=4", "run.progress=false", "run.tracking=false",
              f"run.output_dir={out}"]
    if config == "none":
        command = [sys.executable, "dtvg_scale/train.py", *common]
    else:
        command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                   str(free_port()), "dtvg_scale/train.py", "--ds_config", f"ds_configs/{config}.json", *common]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
        raise SystemExit(f"{config} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny_t5", "smollm2"], default="smollm2")
    parser.add_argument("--configs", nargs="+", default=["none", "zero2", "zero3"])
    args = parser.parse_args()
    options, hidden = model_and_task(args.model)
    prompt_bytes = PROMPT_LENGTH * hidden * 4
    print(f"{args.model}: prompt {PROMPT_LENGTH} x {hidden} fp32 = {prompt_bytes / 1024:.1f} KiB; the checkpoint "
          f"also holds AdamW's 2 moments of it and the best prompt so far (client state)\n")
    print("| config | ranks | files | checkpoint KiB | / prompt bytes | largest file |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="checkpoint_bytes-") as tmp:
        for config in args.configs:
            out = Path(tmp) / config
            run(config, options, out)
            (tag,) = (out / "stage1" / options[1].split("=")[1] / "checkpoints").glob("step*")
            files = sorted(p for p in tag.rglob("*") if p.is_file())
            total = sum(p.stat().st_size for p in files)
            largest = max(files, key=lambda p: p.stat().st_size)
            print(f"| {config} | {1 if config == 'none' else 2} | {len(files)} | {total / 1024:.1f} "
                  f"| {total / prompt_bytes:.2f} | {largest.name} ({largest.stat().st_size / 1024:.1f} KiB) |",
                  flush=True)


if __name__ == "__main__":
    main()
