"""A real sweep: Ray Tune (Optuna + ASHA, ray.init(num_cpus=2)) over 4 short Stage-II trials,
tracked in a real MLflow server started here on 127.0.0.1, checked through its REST API and in
its web UI rendered by headless Chromium; the best config reproduces its run through train.py."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from dtvg_scale.runtime.checkpoint import load_tensors
from dtvg_scale.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = ["model.name_or_path=embedded:t5", "data.target=emb_target",  # the random tiny world, not the default
         "data.sources=[emb_help_a,emb_conf_a]", "data.embedded_train_size=64", "data.embedded_eval_size=16",
         "stage1.steps=6", "stage1.eval_every=3", "stage2.steps=6", "stage2.eval_every=2",
         "data.max_target_length=4", "run.tracking=false"]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A lean MLflow server (one worker, job execution off) with a sqlite backend."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow server did not start")
        yield base
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [sys.executable, "tune/sweep.py", "--out", str(out), "--num_samples", "4", "--max_concurrent", "2",
         "--num_cpus", "2", "--tracking_uri", mlflow_server, "--experiment", "test-sweep", *QUICK],
        cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (out / "sweep.log").write_text(result.stdout)
    return out, json.loads((out / "best.json").read_text())


def test_every_trial_is_a_finished_mlflow_run_with_params_metrics_and_heatmap(mlflow_server, sweep):
    _, best = sweep
    assert best["trials"] == 4 and best["failed_trials"] == 0
    experiment = _api(mlflow_server, "experiments/get-by-name?experiment_name=test-sweep")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    everything = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (parent,) = [r for r in everything if r["info"]["run_name"].startswith("sweep ")]  # the sweep's own run
    runs = [r for r in everything if r is not parent]
    assert len(runs) == 4
    assert {run["info"]["status"] for run in everything} == {"FINISHED"}  # ASHA-stopped ones too
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    assert {t["mlflow.parentRunId"] for t in tags} == {parent["info"]["run_id"]}  # nested under the sweep
    for run in runs:  # named by the searched knobs, then the trial id
        name = run["info"]["run_name"]
        assert name.startswith("kc_weight=") and " threshold=" in name and name.endswith(")"), name
    tagged_best = [r for r, t in zip(runs, tags) if t.get("best_trial") == "true"]
    assert len(tagged_best) == 1
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent_metrics["validation_mean"] == best["best_validation_mean"] and parent_metrics["trials"] == 4
    for run in runs:
        params = {p["key"] for p in run["data"]["params"]}
        assert {"stage2.threshold", "stage2.kc_weight", "stage2.source_scale_lr"} <= params
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"validation_mean", "step"} <= metrics
        files = _api(mlflow_server, f"artifacts/list?run_id={run['info']['run_id']}")["files"]
        assert "group_trace_heatmap.png" in {f["path"] for f in files}


def test_the_best_config_reproduces_its_run_through_train_py(sweep, tmp_path):
    out, best = sweep
    config = yaml.safe_load((out / "best_config.yaml").read_text())
    config["run"]["output_dir"] = str(tmp_path / "again")
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(config))
    # Ray ran the trial with OMP_NUM_THREADS=1 (its one CPU); the same thread count makes the
    # float reductions, and so the prompt, identical bit for bit
    result = subprocess.run([sys.executable, "dtvg_scale/train.py", "--config", str(tmp_path / "best.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "stage2" / "dtvg" / "result.json").read_text())
    assert again["validation"]["mean"] == best["best_validation_mean"]
    trial_prompt = out / "ray" / "test-sweep" / best["best_trial"] / "run" / "stage2" / "dtvg" / "best_prompt.safetensors"
    assert torch.equal(load_tensors(trial_prompt)[0]["prompt"],
                       load_tensors(tmp_path / "again" / "stage2" / "dtvg" / "best_prompt.safetensors")[0]["prompt"])


def test_the_mlflow_ui_shows_the_sweep_in_a_real_browser(mlflow_server, sweep, tmp_path):
    """The link the sweep prints opens the runs table in model-training mode, with a score column,
    one row for the sweep that unfolds into its trials (nested: the trials are not top-level rows)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it as root)")
    out, best = sweep
    experiment = _api(mlflow_server, "experiments/get-by-name?experiment_name=test-sweep")["experiment"]
    url = (f"{mlflow_server}/#/experiments/{experiment['experiment_id']}/runs"
           f"?viewStateShareKey=dtvg_scale&workflowType=machine_learning")
    assert f"MLflow runs: {url}" in (out / "sweep.log").read_text()
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--window-size=1600,900"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    runs = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (parent,) = [run["info"]["run_name"] for run in runs if run["info"]["run_name"].startswith("sweep ")]
    trials = [run["info"]["run_name"] for run in runs if not run["info"]["run_name"].startswith("sweep ")]
    assert "test-sweep" in dom and "Model training" in dom, dom[-2000:]
    assert 'col-id="metrics.`validation_mean`"' in dom  # a score column, shown without asking
    assert f">{parent}<" in dom and "runnamecellrenderer" in dom  # the sweep's row, with its unfold button
    assert "<strong>5</strong> matching runs" in dom and not any(f">{name}<" in dom for name in trials)  # nested
    # and as a person sees it: a screenshot of the runs table (kept with the test's files)
    subprocess.run([*browser, f"--screenshot={tmp_path / 'mlflow_ui.png'}", url], capture_output=True, timeout=180)
    assert (tmp_path / "mlflow_ui.png").stat().st_size > 20_000
