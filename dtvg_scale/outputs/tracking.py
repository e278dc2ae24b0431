"""Experiment tracking for one training run (MLflow), fail-safe.

**Rank 0 only.** A tracker talks to the tracking store from the process that holds it; the
caller creates a real one only on the main rank (``make_tracker(..., is_main=ctx.is_main)``)
and every other rank gets the no-op base ``Tracker``, so calling its methods on every rank is
harmless. Nothing here synchronises ranks.

Use::

    tracker = make_tracker(enabled, tracking_uri, experiment, run_dir, is_main)
    tracker.start(run_name, flatten(config.to_dict()), tags={"stage": "stage2"})
    tracker.log_metrics({"loss": 0.7, "lr": 1e-3}, step=s)     # any number of times
    tracker.log_artifact(out_dir / "group_trace.jsonl")          # files or folders
    tracker.set_tags({"group": "mnli, sst2"})                    # columns in the runs table
    tracker.finish("FINISHED")                                   # or "FAILED" / "KILLED"

Nesting: a job is one parent run (``start(..., record=<job folder>/mlflow_run.json)``: a job
started again after it died reopens the same parent instead of making a second one) and each
stage's run is its child (``start(..., parent_run_id=job.run_id)``), so the UI shows one row per
job that unfolds into its runs. Experiments are marked as model-training experiments
(``mlflow.experimentKind``); ``show_columns`` keeps the runs table's columns in an experiment tag
(one of MLflow's shared views) and ``ui_link`` opens that table in model-training mode.

One ``Tracker`` is one MLflow run. It uses ``MlflowClient`` (explicit run ids, no fluent
global "active run"), so several trackers can live in one process, e.g. Ray Tune trials run
in-process, each with its own run.

Where runs go: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else a local sqlite
store ``sqlite:///<default_store_dir>/mlflow.db`` (MLflow's own default file name, so
``mlflow ui`` started in that folder shows the runs). For a sqlite store, a new experiment keeps
its artifacts beside the database (``<db folder>/mlruns/<experiment>/``) rather than in the
current directory, which is where MLflow would put them. One sqlite file written by many
processes at once can fail with "database is locked": for sweeps, run one ``mlflow server``
and give every process its ``http://`` URI.

Fail-safe: tracking never stops training. If the store cannot be reached at ``start`` or a call
fails later, the tracker warns once (``RuntimeWarning`` through ``warnings``), tries to mark the
run FAILED, and from then on does nothing; no method raises (KeyboardInterrupt and SystemExit
pass through). MLflow's HTTP client retries a dead server for minutes by default (7 retries,
exponential back-off, 120 s timeout); during the tracker's own calls these environment
variables are set to short values unless they are already set in the environment, where the
user's values win:

    MLFLOW_HTTP_REQUEST_MAX_RETRIES=2  MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER=0.2  MLFLOW_HTTP_REQUEST_TIMEOUT=10

(set for the duration of each call under a lock, then restored; MLflow reads them per request).
A refused connection therefore costs about 2 s once, an unanswering server at most ~35 s once.

Values: params are flattened (``flatten``), stringified and cut to MLflow's length limit (6000
characters); keys are cleaned to MLflow's allowed characters. Metrics are logged in one
``log_batch`` call per ``log_metrics`` (with the step); values that are not numbers are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import posixpath
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: HTTP settings applied around the tracker's MLflow calls (a value already in os.environ wins).
HTTP_ENV: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: Settings for the one last "mark the run FAILED" attempt after a failure.
_LAST_TRY_ENV: dict[str, str] = {**HTTP_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}

STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests runs by
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's UI opens a view kept in an experiment tag (``?viewStateShareKey=<key>``: its shared views)
# and in its model-training mode with ``workflowType=machine_learning`` (its default is GenAI)
VIEW_TAG_PREFIX, VIEW_KEY = "mlflow.sharedViewState.", "dtvg_scale"

# MLflow's limits (mlflow.utils.validation), repeated so that nothing needs mlflow at import.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_ENV_LOCK = threading.RLock()
_QUIET = threading.local()


class _QuietRetries(logging.Filter):
    """Drop urllib3's "Retrying (...)" warnings while a tracker call runs in this thread (the
    tracker warns once itself); everyone else's retries are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_QUIET, "on", False) and record.getMessage().startswith("Retrying"))


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


@contextlib.contextmanager
def _mlflow_call_env(env: Mapping[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        added = [key for key in env if key not in os.environ]
        for key in added:
            os.environ[key] = env[key]
        was_quiet = getattr(_QUIET, "on", False)
        _QUIET.on = True
        try:
            yield
        finally:
            _QUIET.on = was_quiet
            for key in added:
                os.environ.pop(key, None)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as flat string params: ``{"stage2": {"threshold": 0.0}}`` ->
    ``{"stage2.threshold": "0.0"}``. Dataclasses are read as dicts, lists and tuples become
    JSON (``'["a", "b"]'``), an empty dict ``"{}"``, anything else ``str(value)``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(dict(value), name))
            else:
                out[name] = "{}"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def _clean_key(key: Any) -> str:
    """A key MLflow accepts: allowed characters only, not a path that normalises elsewhere."""
    text = _BAD_KEY_CHARS.sub("_", str(key))
    if text != posixpath.normpath(text) or text.startswith(("/", "..")):
        text = "/".join(part if part not in ("", ".", "..") else "_" for part in text.split("/"))
    text = text[:MAX_KEY_LENGTH].strip("/") or "_"
    return text


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)  # numbers, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        return None


def default_tracking_uri(default_store_dir: Path) -> str:
    """``sqlite:///<absolute default_store_dir>/mlflow.db``."""
    return f"sqlite:///{(Path(default_store_dir).expanduser().resolve() / 'mlflow.db').as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


class Tracker:
    """Does nothing: used when tracking is off and on every rank but 0. ``MLflowTracker`` is the
    real one. No method raises."""

    run_id: str | None = None

    @property
    def active(self) -> bool:
        """True while a run is open and logging works."""
        return False

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, record: Path | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def show_columns(self, columns: list[str]) -> None:
        pass

    def ui_link(self) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker(Tracker):
    """One MLflow run through ``MlflowClient``. Nothing is contacted before ``start``."""

    def __init__(self, tracking_uri: str | None, experiment: str, default_store_dir: Path) -> None:
        self.default_store_dir = Path(default_store_dir)
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or default_tracking_uri(self.default_store_dir))
        self.experiment = experiment
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._failed = False
        self._finished = False

    @property
    def active(self) -> bool:
        return self.run_id is not None and not (self._failed or self._finished)

    # -- fail-safe plumbing
    def _fail(self, what: str, exc: BaseException) -> None:
        """Warn once, try to mark the run FAILED (one quick attempt), become a no-op."""
        self._failed = True
        warnings.warn(
            f"MLflow tracking to {self.tracking_uri} failed ({what}: {type(exc).__name__}: "
            f"{str(exc)[:500]}); training goes on without tracking for run "
            f"{self.run_id or '(not started)'}.",
            RuntimeWarning, stacklevel=3)
        if self.run_id is not None and self._client is not None:
            try:
                with _mlflow_call_env(_LAST_TRY_ENV):
                    self._client.set_terminated(self.run_id, "FAILED", end_time=_now_ms())
            except Exception as last:  # noqa: BLE001 - the store is gone; nothing more to do
                log.debug("could not mark MLflow run %s FAILED: %s", self.run_id, last)

    # -- the API
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, record: Path | None = None) -> None:
        """Open the run (a child of ``parent_run_id`` if given). With ``record`` (a JSON file), a
        run recorded there for the same store and experiment is reopened instead of creating a
        new one, and a new run is recorded there."""
        if self._failed or self._finished:
            return
        if self.run_id is not None:
            log.warning("tracker for run %s already started; start(%r) ignored", self.run_id, run_name)
            return
        try:
            with _mlflow_call_env(HTTP_ENV):
                if not (record is not None and self._reopen(record)):
                    self._start(run_name, params, {**(tags or {}), **({PARENT_TAG: parent_run_id} if parent_run_id else {})})
                    if record is not None:
                        record.write_text(json.dumps({"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                                      "run_id": self.run_id}, indent=2) + "\n")
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("start", exc)

    def _reopen(self, record: Path) -> bool:
        """Reopen the run ``record`` names, if it is this store's and experiment's and still there."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        if (recorded.get("tracking_uri"), recorded.get("experiment")) != (self.tracking_uri, self.experiment):
            return False
        client = MlflowClient(tracking_uri=self.tracking_uri)
        try:
            run = client.get_run(recorded["run_id"])
        except MlflowException:  # deleted, or another store at the same URI
            return False
        client.update_run(run.info.run_id, status="RUNNING")
        self._client, self.experiment_id, self.run_id = client, run.info.experiment_id, run.info.run_id
        return True

    def _start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            artifact_location = None
            if db is not None:  # beside the database, not in the current directory
                folder = _BAD_KEY_CHARS.sub("_", self.experiment).replace("/", "_") or "experiment"
                artifact_location = (db.resolve().parent / "mlruns" / folder).as_uri()
            try:
                experiment_id = client.create_experiment(self.experiment, artifact_location=artifact_location,
                                                         tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
            except MlflowException:  # created meanwhile by another process or trial
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made elsewhere (a sweep, by hand): open on runs too
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        run_tags = {}
        try:  # what the fluent API records: user, source, git commit
            from mlflow.tracking.context.registry import resolve_tags
            run_tags.update(resolve_tags())
        except Exception as exc:  # noqa: BLE001 - context tags are a nicety
            log.debug("MLflow context tags not resolved: %s", exc)
        run_tags.update({_clean_key(k): _cut(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()})
        self._client, self.experiment_id = client, experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        self.run_id = run.info.run_id
        self._log_params(params)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        for key, value in flatten(dict(params)).items():
            flat[_clean_key(key)] = _cut(value, MAX_PARAM_VAL_LENGTH)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i: i + MAX_PARAMS_PER_BATCH], synchronous=True)

    def show_columns(self, columns: list[str]) -> None:
        """Make ``columns`` (``metrics.`name```, ``tags.`name```, ``params.`name```) the columns
        of the experiment's runs table as ``ui_link`` opens it (MLflow shows no metric by default)."""
        if not self.active:
            return
        try:
            state = json.dumps({"selectedColumns": columns})
            with _mlflow_call_env(HTTP_ENV):
                self._client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, state)
        except Exception as exc:  # noqa: BLE001
            self._fail("show_columns", exc)

    def ui_link(self) -> str | None:
        """Where the runs table opens in model-training mode with ``show_columns``' columns: a
        full URL for an HTTP server, else the path to add to ``mlflow ui``'s address."""
        if self.experiment_id is None:
            return None
        path = f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
        return f"{self.tracking_uri.rstrip('/')}/{path}" if self.tracking_uri.startswith("http") else path

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import RunTag

            items = [RunTag(_clean_key(k), _cut(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
            with _mlflow_call_env(HTTP_ENV):
                self._client.log_batch(self.run_id, tags=items, synchronous=True)
        except Exception as exc:  # noqa: BLE001
            self._fail("set_tags", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        try:
            from mlflow.entities import Metric

            timestamp = _now_ms()
            items = []
            for key, value in metrics.items():
                number = _as_float(value)
                if number is not None:
                    items.append(Metric(_clean_key(key), number, timestamp, int(step)))
            with _mlflow_call_env(HTTP_ENV):
                for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                    self._client.log_batch(self.run_id, metrics=items[i: i + MAX_METRICS_PER_BATCH],
                                           synchronous=True)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_metrics", exc)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if not path.exists():  # the caller's mistake, not the store's: skip, keep tracking
            log.warning("artifact %s does not exist; not logged to MLflow", path)
            return
        try:
            with _mlflow_call_env(HTTP_ENV):
                if path.is_dir():
                    self._client.log_artifacts(self.run_id, str(path), artifact_path)
                else:
                    self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_artifact", exc)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        status = str(status).upper()
        if status not in STATUSES:
            log.warning("unknown run status %r; recording FAILED", status)
            status = "FAILED"
        try:
            with _mlflow_call_env(HTTP_ENV):
                self._client.set_terminated(self.run_id, status, end_time=_now_ms())
            self._finished = True
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)



def log_run_files(tracker: Tracker, out_dir: Path, extra_files: dict[str, Any]) -> None:
    """What a run leaves behind, as artifacts of its MLflow run: ``extra_files`` written into
    ``out_dir`` first as JSON (e.g. the resolved DeepSpeed config), the group trace's heatmap and
    similarity-over-time plots when the run has a trace, then every file of ``out_dir``."""
    if not tracker.active:
        return
    from dtvg_scale.outputs import group_trace
    from dtvg_scale.outputs.plots import group_trace_heatmap, similarity_over_time  # matplotlib: only when tracked

    for name, value in extra_files.items():
        (out_dir / name).write_text(json.dumps(value, indent=2) + "\n")
    trace = out_dir / group_trace.FILE_NAME
    if trace.is_file():
        group_trace_heatmap(trace, out_dir / "group_trace_heatmap.png")
        similarity_over_time(trace, out_dir / "similarity_over_time.png")
    for path in sorted(out_dir.iterdir()):
        if path.is_file():
            tracker.log_artifact(path)

def result_columns(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a finished run's ``result.json`` worth a column in the runs table: the
    best prompt's validation and test score in the task's reported metric and, in Stage II, the
    group merged into that prompt and its size."""
    metric = result.get("reported_metric", "mean")
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        scores = result.get(split) or {}
        if metric in scores:
            metrics[f"final_{split}"] = scores[metric]
    tags = {"reported_metric": metric}
    if "group_at_best" in result:
        metrics["final_group_size"] = len(result["group_at_best"])
        tags["group"] = ", ".join(result["group_at_best"]) or "(target only)"
    return metrics, tags


def make_tracker(enabled: bool, tracking_uri: str | None, experiment: str, run_dir: Path, is_main: bool) -> Tracker:
    """An ``MLflowTracker`` on the main rank when tracking is on, else the no-op ``Tracker``.
    ``run_dir`` is where the default sqlite store goes (``<run_dir>/mlflow.db``): pass the job's
    output folder (``run.output_dir``), so every run of the job lands in one store."""
    if not (enabled and is_main):
        return Tracker()
    return MLflowTracker(tracking_uri, experiment, Path(run_dir))
