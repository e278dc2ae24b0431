"""Experiment tracking (MLflow, local sqlite store; an unreachable server) and the trace plots."""

from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dtvg_scale.outputs import plots
from dtvg_scale.outputs.tracking import MLflowTracker, Tracker, flatten, make_tracker, result_columns

CONFIG = {
    "model": {"name_or_path": "embedded:t5"},
    "data": {"target": "emb_target", "sources": ["emb_help_1", "emb_conf_1"], "extra": {}},
    "stage2": {"threshold": 0.0, "kc_weight": None, "lr": 1e-3},
    "note": "x" * 7000,
}


def _tracker_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("MLflow tracking to")]


def test_flatten_nested_config():
    assert flatten(CONFIG | {"note": "n"}) == {
        "model.name_or_path": "embedded:t5",
        "data.target": "emb_target",
        "data.sources": '["emb_help_1", "emb_conf_1"]',
        "data.extra": "{}",
        "stage2.threshold": "0.0",
        "stage2.kc_weight": "None",
        "stage2.lr": "0.001",
        "note": "n",
    }
    assert flatten({"a": {"b": {"c": 1}}}, prefix="cfg") == {"cfg.a.b.c": "1"}


def test_tracker_logs_to_a_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker(True, None, "dtvg-test", tmp_path, is_main=True)
    assert isinstance(tracker, MLflowTracker)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start("stage2/dtvg", CONFIG, tags={"stage": "stage2"})
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3, "validation/mean": 0.5 + step,
                                 "not_a_number": "skip me"}, step=step)
        artifact = tmp_path / "group_trace.jsonl"
        artifact.write_text('{"step": 0}\n')
        tracker.log_artifact(artifact)
        folder = tmp_path / "plots"
        folder.mkdir()
        (folder / "a.png").write_bytes(b"png")
        tracker.log_artifact(folder, artifact_path="plots")
        tracker.finish()
    assert _tracker_warnings(caught) == []
    assert (tmp_path / "mlflow.db").is_file()
    assert not any(k.startswith("MLFLOW_HTTP_REQUEST") for k in os.environ)  # restored after each call

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stage2/dtvg"
    assert run.data.tags["stage"] == "stage2"
    params = run.data.params
    assert params["stage2.threshold"] == "0.0"
    assert params["data.sources"] == '["emb_help_1", "emb_conf_1"]'
    assert params["model.name_or_path"] == "embedded:t5"
    assert len(params["note"]) <= 6000 and params["note"].endswith("...")
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == \
        [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "validation/mean")] == [0, 1, 2]
    assert "not_a_number" not in run.data.metrics
    assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"group_trace.jsonl", "plots"}
    assert [f.path for f in client.list_artifacts(tracker.run_id, "plots")] == ["plots/a.png"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").resolve().as_uri())  # beside the db

    # a second tracker, same store and experiment, in the same process: its own run
    second = MLflowTracker(None, "dtvg-test", tmp_path)
    second.start("stage2/spot", {"stage2": {"threshold": 0.5}})
    second.log_metrics({"loss": 2.0}, step=0)
    second.finish("KILLED")
    assert second.run_id != tracker.run_id
    assert client.get_run(second.run_id).info.status == "KILLED"
    assert client.get_run(second.run_id).data.params == {"stage2.threshold": "0.5"}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    second.finish()  # after finish: a no-op
    second.log_metrics({"loss": 1.0}, step=1)
    assert client.get_run(second.run_id).info.status == "KILLED"


def test_a_failure_mid_run_warns_once_and_marks_the_run_failed(tmp_path):
    tracker = MLflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "dtvg-test", tmp_path)
    tracker.start("r", {"a": 1})

    def broken(*args, **kwargs):
        raise ConnectionError("store went away")

    tracker._client.log_batch = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_artifact(__file__)
        tracker.finish()
    assert len(_tracker_warnings(caught)) == 1 and "store went away" in _tracker_warnings(caught)[0]
    assert not tracker.active
    assert MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_off_and_other_ranks_get_the_no_op_tracker(tmp_path):
    for tracker in (make_tracker(False, None, "x", tmp_path, is_main=True),
                    make_tracker(True, None, "x", tmp_path, is_main=False)):
        assert type(tracker) is Tracker and not tracker.active
        tracker.start("r", {"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(tmp_path / "missing")
        tracker.finish("FAILED")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_server_is_tried_a_bounded_number_of_times_warns_once_and_raises_nothing(tmp_path):
    """A server that drops every connection: the tracker's bounded retries, then no more tries
    (MLflow's own default would retry for minutes at every call)."""
    attempts = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]

    def drop_every_connection():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=drop_every_connection, daemon=True).start()
    tracker = make_tracker(True, f"http://127.0.0.1:{port}", "dtvg-test", tmp_path, is_main=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start("r", CONFIG)
        tried = len(attempts)
        for step in range(10):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_artifact(__file__)
        tracker.finish()
    server.close()
    assert 1 <= tried <= 3  # the first request and its (at most 2) retries
    assert len(attempts) == tried  # after the failure nothing is tried again
    assert len(_tracker_warnings(caught)) == 1
    assert f"127.0.0.1:{port}" in _tracker_warnings(caught)[0]
    assert not tracker.active and tracker.run_id is None
    assert not any(k.startswith("MLFLOW_HTTP_REQUEST") for k in os.environ)


# -- plots
def _write_trace(path: Path, sources: int, steps: int) -> Path:
    names = [f"src_{i}" for i in range(sources)]
    with path.open("w") as handle:
        for step in range(steps):
            similarity = {n: round(((i * 7 + step) % 11) / 5.5 - 1.0, 3) for i, n in enumerate(names)}
            group = sorted(similarity, key=similarity.get, reverse=True)[:2]
            handle.write(json.dumps({"step": step, "similarity": similarity, "kc": [0.5, 0.4],
                                     "candidates": 3, "group_size": len(group), "group": group}) + "\n")
    return path


def _png(path: Path):
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 5_000
    return imread(path)


def test_plots_of_a_trace(tmp_path):
    width = int(plots.WIDTH_IN * plots.DPI)
    trace = _write_trace(tmp_path / "group_trace.jsonl", sources=8, steps=40)
    heat = plots.group_trace_heatmap(trace, tmp_path / "out" / "heat.png")
    lines = plots.similarity_over_time(trace, tmp_path / "out" / "lines.png")
    assert heat == tmp_path / "out" / "heat.png" and lines == tmp_path / "out" / "lines.png"
    image = _png(heat)
    assert image.shape[1] == width and image.shape[0] > 400 and image.shape[2] in (3, 4)
    assert image.std() > 0.05  # not a blank canvas
    assert _png(lines).shape[:2] == (int(plots.LINES_HEIGHT_IN * plots.DPI), width)

    # more steps than pixels: binned; many sources: no legend, names at the edge
    dense = _write_trace(tmp_path / "dense.jsonl", sources=30, steps=2500)
    assert _png(plots.group_trace_heatmap(dense, tmp_path / "dense_heat.png")).shape[1] == width
    assert _png(plots.similarity_over_time(dense, tmp_path / "dense_lines.png")).shape[1] == width

    one = _write_trace(tmp_path / "one.jsonl", sources=6, steps=1)
    assert _png(plots.group_trace_heatmap(one, tmp_path / "one_heat.png")).shape[1] == width
    assert _png(plots.similarity_over_time(one, tmp_path / "one_lines.png")).shape[1] == width


def test_plots_of_an_empty_or_missing_trace(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for source in (empty, tmp_path / "missing.jsonl"):
        for draw in (plots.group_trace_heatmap, plots.similarity_over_time):
            out = draw(source, tmp_path / f"{source.stem}_{draw.__name__}.png")
            assert _png(out).shape[:2] == (int(plots.EMPTY_HEIGHT_IN * plots.DPI), int(plots.WIDTH_IN * plots.DPI))


def test_a_job_run_nests_its_runs_and_is_reopened_when_the_job_starts_again(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    record = tmp_path / "mlflow_run.json"
    job = MLflowTracker(uri, "dtvg-test", tmp_path)
    job.start("job", {"a": 1}, record=record)
    child = MLflowTracker(uri, "dtvg-test", tmp_path)
    child.start("job/stage2/dtvg", {"a": 1}, parent_run_id=job.run_id)
    metrics, tags = result_columns({"reported_metric": "f1", "validation": {"f1": 0.5, "mean": 0.6},
                                    "test": {"f1": 0.4, "mean": 0.45}, "group_at_best": ["mnli", "sst2"]})
    assert (metrics, tags) == ({"final_validation": 0.5, "final_test": 0.4, "final_group_size": 2},
                               {"reported_metric": "f1", "group": "mnli, sst2"})
    child.log_metrics(metrics, step=10)
    child.set_tags(tags)
    child.finish()
    job.finish("KILLED")  # the job died; started again, it reopens the same parent run
    again = MLflowTracker(uri, "dtvg-test", tmp_path)
    again.start("job", {"a": 1}, record=record)
    assert again.run_id == job.run_id
    client = MlflowClient(uri)
    assert client.get_run(job.run_id).info.status == "RUNNING"
    again.finish()
    experiment = client.get_experiment_by_name("dtvg-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"job", "job/stage2/dtvg"}
    assert runs["job"].info.status == "FINISHED"
    assert runs["job/stage2/dtvg"].data.tags["mlflow.parentRunId"] == job.run_id
    assert runs["job/stage2/dtvg"].data.tags["group"] == "mnli, sst2"
    assert runs["job/stage2/dtvg"].data.metrics["final_test"] == 0.4
    # a record of another store or experiment is not reopened: a new run is made and recorded
    other = MLflowTracker(uri, "another", tmp_path)
    other.start("job", {"a": 1}, record=record)
    assert other.run_id != job.run_id and json.loads(record.read_text())["run_id"] == other.run_id
    assert result_columns({"reported_metric": "accuracy", "validation": {"accuracy": 1.0}, "test": None}) == (
        {"final_validation": 1.0}, {"reported_metric": "accuracy"})
