"""Progress off a terminal: a few plain lines (no bar redraws), with step, loss, best and pace;
on a terminal, the bar. And a whole redirected train.py job writes a small log."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from dtvg_scale.runtime import progress as progress_module
from dtvg_scale.runtime.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(stream, clock, total=1000, seconds_per_step=0.5, evaluate_every=250):
    bar = Progress("stage1/rte", total, 0, enabled=True, stream=stream)
    best = 0.5
    for step in range(total):
        clock.now += seconds_per_step
        bar.step(step, loss=1.0 / (step + 1), best=best)
        if (step + 1) % evaluate_every == 0:
            best = 0.6
            bar.evaluated(step, 0.6, best)
    bar.close()


def test_a_log_file_gets_a_line_per_tenth_and_per_evaluation(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    log = io.StringIO()
    run_steps(log, clock)  # 500 s in all: every tenth (50 s) is past the 20 s minimum
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10 + 4
    assert lines[0] == "stage1/rte  step 100/1000 (10%)  loss 0.0100  best 0.500  0.50 s/step  eta 7m30s"
    assert lines[2] == "stage1/rte  step 250/1000 (25%)  loss 0.0040  best 0.600  validation 0.600  0.50 s/step  eta 6m15s"


def test_fast_runs_write_only_their_evaluations(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    log = io.StringIO()
    run_steps(log, clock, seconds_per_step=0.01)  # 10 s in all: no step line is 20 s after the last
    assert [line.split("  ")[1] for line in log.getvalue().splitlines()] == [
        "step 250/1000 (25%)", "step 500/1000 (50%)", "step 750/1000 (75%)", "step 1000/1000 (100%)"]


def test_a_terminal_gets_the_bar_and_other_ranks_get_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    terminal = FakeTerminal()
    run_steps(terminal, clock, total=50, evaluate_every=25)
    assert "\r" in terminal.getvalue() and "validation" not in terminal.getvalue()  # tqdm's redraws
    quiet = io.StringIO()
    bar = Progress("stage1/rte", 50, 0, enabled=False, stream=quiet)
    for step in range(50):
        bar.step(step, 1.0, 0.5)
        bar.evaluated(step, 0.5, 0.5)
    assert quiet.getvalue() == ""


def test_a_redirected_job_writes_a_small_log(tmp_path):
    """train.py with stderr and stdout in a file (as under slurm): the progress of every run is a
    few lines, transformers' loading bars are gone, and the summary is there."""
    log_path = tmp_path / "job.log"
    args = [f"run.output_dir={tmp_path / 'run'}", "model.name_or_path=embedded:t5", "data.target=emb_target",
            "data.sources=[emb_help_a]", "data.embedded_train_size=64",
            "data.embedded_eval_size=16", "stage1.steps=40", "stage1.eval_every=20", "stage2.steps=20",
            "stage2.eval_every=10", "stage2.strategies=[dtvg,target_only]", "data.max_target_length=4",
            "run.tracking=false"]  # run.progress stays on: the default
    with log_path.open("w") as log:
        result = subprocess.run([sys.executable, "dtvg_scale/train.py", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    text = log_path.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text and "Loading weights" not in text
    progress_lines = [line for line in text.splitlines() if " step " in line and "/" in line.split(" step ")[1]]
    # four runs, each at least its evaluations (2 per Stage-I run, 2 per Stage-II run)
    assert {line.split()[0] for line in progress_lines} == {"stage1/emb_target", "stage1/emb_help_a",
                                                            "stage2/dtvg", "stage2/target_only"}
    assert len(progress_lines) <= 4 * (10 + 2)
    assert "Target emb_target" in text
    assert len(text.encode()) < 8_000, text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["target"] == "emb_target"
