"""Bring your own task: a YAML task file makes a task usable as a target and as a source with no
code change, checked like the built-in ones (one clear line for a bad file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtvg_scale.data import benchmark_tasks, tasks
from dtvg_scale.recipes.config import DataArgs
from dtvg_scale.data.task_files import TaskFileError, load_task_file, register_task_files

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHIPPED = [str(ROOT / "configs" / "tasks" / "movie_reviews.yaml"), str(ROOT / "configs" / "tasks" / "paraphrases.yaml")]
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"the real GLUE/SuperGLUE files are not at {DATA}")


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Task files registered by a test stay in that test (the registry is per process)."""
    monkeypatch.setattr(benchmark_tasks, "_USER_SPECS", {})


def test_a_task_file_loads_formats_and_scores_like_a_built_in_task():
    (reviews, paraphrases) = register_task_files(SHIPPED)
    assert (reviews, paraphrases) == ("movie_reviews", "paraphrases")
    assert register_task_files(SHIPPED) == ["movie_reviews", "paraphrases"]  # idempotent
    assert "movie_reviews" in tasks.known_tasks()
    splits = tasks.load_task("movie_reviews", DataArgs(k_shot=4, seed=1, max_eval_samples=10))
    assert len(splits.train) == 8 and sorted(e.target for e in splits.train) == ["negative"] * 4 + ["positive"] * 4
    assert len(splits.validation) == len(splits.test) == 10
    # the cap draws its 10 rows at random (data.split_seed), in the file's order
    rows = [json.loads(line) for line in (DATA / "other" / "rotten_tomatoes" / "test.jsonl").open()]
    first = tasks.eval_subset(rows, 10, DataArgs().split_seed)[0]
    assert splits.test[0].source == f"review: {first['text']}"
    assert splits.test[0].target == ("positive" if first["label"] == 1 else "negative")
    assert splits.labels == ("negative", "positive") and tasks.reported_metric("movie_reviews") == "accuracy"
    scores = tasks.scorer("movie_reviews")(["positive", "negative"], splits.test[:2])
    assert set(scores) == {"accuracy", "f1", "mean"}
    source = tasks.load_task("paraphrases", DataArgs(max_train_samples=5), decoder_only=True, role="source")
    assert source.test == [] and len(source.train) == 5
    assert source.train[0].source.startswith("first: ") and source.train[0].source.endswith(" Label : ")
    assert {e.target for e in source.validation} == {"different", "same"}


@pytest.mark.parametrize("content, message", [
    ("name: x\ntemplate: '{text}'\nlabel_field: label\nlabels: {0: a, 1: b}\n", "give either 'files'"),
    ("name: x\nfiles: {train: nope.jsonl, validation: nope.jsonl}\ntemplate: '{text}'\nlabel_field: label\n"
     "labels: {0: a, 1: b}\n", "train: file not found"),
    ("name: x\nhub: {dataset: d}\ntemplate: 'no fields'\nlabel_field: label\nlabels: {0: a, 1: b}\n", "names no field"),
    ("name: x\nhub: {dataset: d}\ntemplate: '{text}'\nlabel_field: label\nlabels: {0: a, 1: b}\nmetrics: [bleu]\n",
     "metric 'bleu' is not one for a classification task"),
    ("name: x\nhub: {dataset: d}\ntemplate: '{text}'\nlabels: {0: a, 1: a}\nlabel_field: label\n",
     "every class its own non-empty word"),
    ("name: sst2\nhub: {dataset: d}\ntemplate: '{text}'\nanswer_field: a\n", "'sst2' is a built-in task"),
    ("name: x\nhub: {dataset: d}\ntemplate: '{text}'\nanswer_field: a\ncolour: red\n", "unknown key 'colour'"),
])
def test_a_bad_task_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "task.yaml"
    path.write_text(content)
    with pytest.raises(TaskFileError, match=message) as caught:
        register_task_files([str(path)])
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_template_field_the_data_lacks_stops_with_one_line(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(f"name: typo_task\nfiles: {{train: {DATA}/glue/mrpc/train.jsonl, "
                    f"validation: {DATA}/glue/mrpc/validation.jsonl}}\ntemplate: '{{sentense1}}'\n"
                    f"label_field: label\nlabels: {{0: a, 1: b}}\n")
    spec = load_task_file(path)
    benchmark_tasks.register_spec(spec)
    with pytest.raises(TaskFileError, match="the template names field 'sentense1', which its data does not have"):
        tasks.load_task("typo_task", DataArgs(max_train_samples=2), role="source")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "dtvg_scale/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def test_task_files_train_as_target_and_as_source(tmp_path):
    """Both stages: movie_reviews (a task file) is the target, paraphrases (another) a source."""
    out = tmp_path / "run"
    result = run(f"run.output_dir={out}", "model.name_or_path=embedded:t5",
                 f"data.task_files=[{SHIPPED[0]},{SHIPPED[1]}]", "data.target=movie_reviews",
                 "data.sources=[paraphrases]", "data.max_train_samples=64", "data.max_eval_samples=16",
                 "stage1.steps=6", "stage1.eval_every=3", "stage2.steps=4", "stage2.eval_every=2",
                 "stage2.strategies=[dtvg]", "data.max_target_length=4", "run.progress=false", "run.tracking=false")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["stage1"]) == {"movie_reviews", "paraphrases"}
    assert set(summary["stage2"]["dtvg"]["test"]) == {"accuracy", "f1", "mean"}
    trace = [json.loads(line) for line in (out / "stage2" / "dtvg" / "group_trace.jsonl").read_text().splitlines()]
    assert [list(row["similarity"]) for row in trace] == [["paraphrases"]] * 4  # ranked at every step
    predictions = [json.loads(line) for line in (out / "stage2" / "dtvg" / "test_predictions.jsonl").read_text().splitlines()]
    assert {p["target"] for p in predictions} <= {"negative", "positive"} and predictions[0]["input"].startswith("review: ")
    data = json.loads((out / "data.json").read_text())
    assert data["movie_reviews"]["examples"] == {"train": 64, "validation": 16, "test": 16}
    assert data["paraphrases"]["role"] == "source"
