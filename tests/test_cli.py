"""train.py as one process (a world of one): bad input stops with one clear line (no traceback),
early, and leaves nothing half-written; every shipped DeepSpeed config trains."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["model.name_or_path=embedded:t5", "data.target=emb_target",  # the random tiny world, not the default
         "data.sources=[emb_help_a]", "data.embedded_train_size=64", "data.embedded_eval_size=16",
         "stage1.steps=4", "stage1.eval_every=2", "stage2.steps=2", "stage2.eval_every=2",
         "stage2.strategies=[dtvg]", "data.max_target_length=4", "run.progress=false", "run.tracking=false"]


def train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "dtvg_scale/train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_clear_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize(
    "args, message",
    [  # what load_config refuses (unknown keys and strategies, "did you mean") is in test_config.py
        (["data.target=rte_typo"], "unknown task 'rte_typo'"),
        (["data.sources=[emb_help_a,nope]"], "unknown task 'nope'"),
        (["model.name_or_path=./no/such/model"], "model path not found: ./no/such/model"),
        (["model.name_or_path=controlled:t5"], "controlled:t5 knows the controlled world's tasks only"),
        (["data.split_overrides=[rte.validation=validation]"], "names rte, not a task of this run"),
        (["prompt.length=100"], "prompt.length=100 needs that many distinct embedding rows, but P_init is drawn from 80"),
    ],
)
def test_bad_options_stop_before_training(tmp_path, args, message):
    result = train(f"run.output_dir={tmp_path / 'run'}", *QUICK, *args)
    assert_one_clear_error(result, message)
    assert not (tmp_path / "run" / "stage1").exists()  # no work was started


@pytest.mark.parametrize("option, accepted", [  # every range is checked in test_config.py; here the exit
    ("prompt.length=-3", "prompt.length must be an integer >= 1, got -3"),  # code and that nothing is written
    ("run.output_dir=README.md", "run.output_dir must be a folder (existing or new), not a file, got 'README.md'"),
])
def test_an_option_out_of_range_stops_with_exit_code_2_and_writes_nothing(tmp_path, option, accepted):
    result = train(f"run.output_dir={tmp_path / 'run'}", *QUICK, option)
    assert result.returncode == 2 and result.stderr == f"error: {accepted}\n", result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_sweep_and_report_arguments_are_checked_before_anything_starts(tmp_path, capsys):
    """In this process: the checks come before Ray, Stage I or a process group would start."""
    from dtvg_scale.recipes import report, sweep

    (tmp_path / "stage1" / "emb_target").mkdir(parents=True)
    for args, message in [
        (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
        (["--cpus_per_trial", "0"], "--cpus_per_trial must be > 0, got 0.0"),
        (["--ranks_per_trial", "2", "--num_cpus", "2"], "a trial needs 2.1 CPUs"),  # Ray would wait forever
        (["--stage1_dir", str(tmp_path / "stage1")], "has no Stage-I prompt of emb_target, emb_help_a"),
        (["stage2.temperature=0"], "stage2.temperature must be a number > 0"),
    ]:
        code = sweep.main(["--out", str(tmp_path / "sweep"), *args, *QUICK])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "sweep").exists()  # neither Ray nor Stage I started
    assert report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "is not a train.py run directory" in capsys.readouterr().err


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                     "zero_optimization": {"stage": 3}}))
    assert_one_clear_error(train("--ds_config", str(ds_config), f"run.output_dir={tmp_path}"), "sets 'optimizer'")
    assert_one_clear_error(train("--ds_config", str(tmp_path / "missing.json")), "DeepSpeed config not found")


def test_nan_loss_stops_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = train(f"run.output_dir={out}", *QUICK, "stage1.lr=.inf", "run.stages=stage1")
    assert_one_clear_error(result, "loss is nan at step 1")
    run = out / "stage1" / "emb_target"
    assert not (run / "checkpoints").exists() and not (run / "result.json").exists()


def test_stage1_vectors_must_match_shape_and_init_prompt(tmp_path):
    first = tmp_path / "first"
    ok = train(f"run.output_dir={first}", *QUICK, "run.stages=stage1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    stage1 = f"run.stage1_dir={first / 'stage1'}"
    other_init = train(f"run.output_dir={tmp_path / 'b'}", *QUICK, "run.stages=stage2", stage1, "prompt.init_seed=7")
    assert_one_clear_error(other_init, "was trained from another P_init")
    other_shape = train(f"run.output_dir={tmp_path / 'c'}", *QUICK, "run.stages=stage2", stage1, "prompt.length=4")
    assert_one_clear_error(other_shape, "task vector of 'emb_target' has shape (8, 64), expected (4, 64)")
    # and the matching Stage II runs from them
    fine = train(f"run.output_dir={tmp_path / 'd'}", *QUICK, "run.stages=stage2", stage1)
    assert fine.returncode == 0, fine.stderr[-3000:]
    assert "dtvg" in json.loads((tmp_path / "d" / "results.json").read_text())["stage2"]


def test_a_backbone_changed_under_the_same_name_is_refused_on_resume(tmp_path):
    import shutil

    import transformers

    first = train(f"run.output_dir={tmp_path / 'embedded'}", *QUICK, "run.stages=stage1", "stage1.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (built,) = [p for p in (tmp_path / ".backbones").iterdir() if (p / "config.json").is_file()]
    model_dir = tmp_path / "model"
    shutil.copytree(built, model_dir)
    run = [f"run.output_dir={tmp_path / 'run'}", *QUICK, f"model.name_or_path={model_dir}", "run.stages=stage1",
           "stage1.steps=2"]
    assert train(*run).returncode == 0
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)  # retrained, say, and saved in place
    model.save_pretrained(model_dir)
    # Stage I is done and skipped; Stage II would merge the old model's vectors into the new one
    assert_one_clear_error(train(*run, "run.stages=all"), "has changed since")
    assert not (tmp_path / "run" / "stage2").exists()


@pytest.mark.parametrize("ds_config", [None, "zero2.json", "zero3.json", "zero3_offload.json"])
def test_every_shipped_deepspeed_config_trains_on_cpu(tmp_path, ds_config):
    from dtvg_scale.runtime.checkpoint import load_state

    out = tmp_path / "run"
    given = ["--ds_config", f"ds_configs/{ds_config}"] if ds_config else []  # None: ZeRO off
    result = train(*given, f"run.output_dir={out}", *QUICK, "run.stages=stage1", "data.sources=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "stage1" / "emb_target" / "result.json").read_text())["steps"] == 4
    # the checkpoint holds the trainable prompt, none of the frozen backbone (T5's tied embedding
    # table has four names; every one of them used to slip into ZeRO-0/1/2 checkpoints)
    (model_file,) = (out / "stage1" / "emb_target" / "checkpoints" / "step3").glob("*model_states.pt")
    assert list(load_state(model_file)["module"]) == ["prompt.prompt"]


def damage(tag_dir: Path, how: str) -> str:
    """Damage one checkpoint tag as a crash, a full disk or a bad disk would; returns the file."""
    if how == "killed during the save":
        (tag_dir / "manifest.json").unlink()
        return str(tag_dir)
    (optimizer,) = tag_dir.glob("*optim_states.pt")
    (model,) = tag_dir.glob("*model_states.pt")
    if how == "flipped bytes":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
        return str(model)
    if how == "cut short":
        optimizer.write_bytes(optimizer.read_bytes()[:-100])
        return str(optimizer)
    optimizer.unlink()  # a rank's file missing
    return str(optimizer)


def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(tmp_path):
    """ZeRO-2 (a model file and a rank's optimizer file per tag), a checkpoint every 2 steps, the
    newest two kept. A run stopped after step 5 has step3 and step5; started again it ends exactly
    as a run never stopped. Then step5 is damaged in each way: the run started again names the
    file, resumes from step3 and ends the same. With both tags damaged it stops with one line."""
    import shutil

    common = ["--ds_config", "ds_configs/zero2.json", *QUICK, "run.stages=stage1", "data.sources=[]",
              "stage1.steps=8", "stage1.eval_every=2"]
    assert train(*common, f"run.output_dir={tmp_path / 'straight'}").returncode == 0
    stopped = train(*common, f"run.output_dir={tmp_path / 'stopped'}", "run.stop_after=6")
    assert stopped.returncode == 0 and "stopped after step 5" in stopped.stdout
    checkpoints = Path("stage1") / "emb_target" / "checkpoints"
    assert sorted(p.name for p in (tmp_path / "stopped" / checkpoints).iterdir()) == ["step3", "step5"]
    expected = (tmp_path / "straight" / "stage1" / "emb_target" / "metrics.jsonl").read_text()
    from dtvg_scale.runtime.checkpoint import load_tensors

    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")  # undamaged: the same command just goes on
    assert train(*common, f"run.output_dir={tmp_path / 'resumed'}").returncode == 0
    assert (tmp_path / "resumed" / "stage1" / "emb_target" / "metrics.jsonl").read_text() == expected
    for name in ("best_prompt.safetensors", "last_prompt.safetensors"):
        assert torch.equal(load_tensors(tmp_path / "straight" / "stage1" / "emb_target" / name)[0]["prompt"],
                           load_tensors(tmp_path / "resumed" / "stage1" / "emb_target" / name)[0]["prompt"])
    for how in ("killed during the save", "a rank file missing"):  # flipped bytes, cut short: detected below
        out = tmp_path / how.replace(" ", "_")
        shutil.copytree(tmp_path / "stopped", out)
        named = damage(out / checkpoints / "step5", how)
        result = train(*common, f"run.output_dir={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert named in warning and "resuming from step3" in warning, (how, warning)
        assert (out / "stage1" / "emb_target" / "metrics.jsonl").read_text() == expected, how
        assert (out / checkpoints / "damaged-step5").is_dir()  # kept aside for a look
    # a full disk during a save (a file-size limit below the optimizer file's 8 KB): one line, the
    # checkpoint before it intact, and the same command with space back ends as if never stopped
    out = tmp_path / "full_disk"
    shutil.copytree(tmp_path / "stopped", out)

    def little_space() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (7500, 7500))

    full = subprocess.run([sys.executable, "dtvg_scale/train.py", *common, f"run.output_dir={out}"], cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300,
                          preexec_fn=little_space)
    assert_one_clear_error(full, "error: no space to write ")
    assert "step7" in full.stderr and "run the same command again" in full.stderr and full.stderr.count("\n") == 1
    assert sorted(p.name for p in (out / checkpoints).iterdir()) == ["step3", "step5"]  # nothing half-written
    assert train(*common, f"run.output_dir={out}").returncode == 0
    assert (out / "stage1" / "emb_target" / "metrics.jsonl").read_text() == expected

    out = tmp_path / "both"
    shutil.copytree(tmp_path / "stopped", out)
    newest = damage(out / checkpoints / "step5", "flipped bytes")
    previous = damage(out / checkpoints / "step3", "cut short")
    result = train(*common, f"run.output_dir={out}")
    assert_one_clear_error(result, "no complete checkpoint to resume from: ")
    assert newest in result.stderr and previous in result.stderr and result.stderr.count("\n") == 1


def test_stage1_quality_gate_retrains_then_excludes_a_weak_source(tmp_path):
    out = tmp_path / "run"
    result = train(f"run.output_dir={out}", *QUICK, "stage1.min_score=1.0", "stage1.gate_retries=1")
    assert result.returncode == 0, result.stderr[-3000:]
    gate = json.loads((out / "stage1" / "gate.json").read_text())
    assert list(gate) == ["emb_help_a"] and gate["emb_help_a"]["excluded"] is True
    assert len(gate["emb_help_a"]["validation_means"]) == 2  # first try + one retraining
    assert (out / "stage1" / "emb_help_a.attempt1" / "result.json").is_file()
    trace = (out / "stage2" / "dtvg" / "group_trace.jsonl").read_text().splitlines()
    assert all(json.loads(line)["similarity"] == {} for line in trace)  # Stage II ran without it
    summary = json.loads((out / "results.json").read_text())
    assert summary["stage1"]["emb_help_a"]["gate"]["excluded"] is True


def test_training_goes_on_when_the_tracking_server_is_down(tmp_path):
    out = tmp_path / "run"
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = train(f"run.output_dir={out}", *QUICK, "run.tracking=true", f"run.tracking_uri={dead}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert 1 <= result.stderr.count("MLflow tracking to") <= 5  # a warning, not a failure
    for run in ("stage1/emb_target", "stage1/emb_help_a", "stage2/dtvg"):
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        steps = 4 if run.startswith("stage1") else 2
        assert [r["step"] for r in rows if "loss" in r] == list(range(steps))  # nothing lost
        assert sum("validation" in r for r in rows) == steps // 2  # eval_every=2


def test_the_console_scripts_are_the_documented_commands(tmp_path):
    """pyproject's console scripts (README: "the same as its module") reach each command's own
    argument handling: its usage line, and for dtvg-train the range check with exit code 2."""
    bin_dir = Path(sys.executable).parent
    for name in ("dtvg-sweep", "dtvg-export", "dtvg-fetch-model"):
        result = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {name}"), result.stderr[-2000:]
    result = subprocess.run([str(bin_dir / "dtvg-train"), f"run.output_dir={tmp_path / 'run'}", "prompt.length=-3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == "error: prompt.length must be an integer >= 1, got -3\n"
    assert not (tmp_path / "run").exists()
