"""Bring your own task: a small YAML file defines a target or source task, no code change.

    data.task_files=[my_task.yaml] data.target=my_reviews

A task file (paths in it are relative to the file)::

    name: my_reviews                      # the name data.target / data.sources use
    files:                                # local JSON-lines (.jsonl) or CSV (.csv) files, one per split
      train: reviews/train.jsonl
      validation: reviews/validation.jsonl
      test: reviews/test.jsonl            # a source needs none (nothing scores a source on test)
    # or, instead of files, a hub dataset:
    # hub: {dataset: cornell-movie-review-data/rotten_tomatoes, config: null,
    #       splits: {train: train, validation: validation, test: test}}
    template: "review: {text}"            # the input; {field} is the row's field
    label_field: label                    # classification: the field holding the class ...
    labels: {0: negative, 1: positive}    # ... and the target word of each value
    # answer_field: answer                # or generation: the target text (a list: every gold answer)
    metrics: [accuracy]                   # the first is the reported one (and ranks validation)

Metrics: ``accuracy``, ``f1`` (of the second label; two labels), ``f1_multiclass``,
``matthews_correlation``, ``pearson``, ``spearmanr`` for classification; ``em`` and ``f1``
(SQuAD's, over every gold answer) for generation. The task then loads like a built-in one
(``dtvg_scale.data.benchmark_tasks``): its splits are used as given (no ATTEMPT split rule), ``k_shot``
and ``max_train_samples`` apply, decoder-only backbones get the same ``" Label : "`` cue. A
missing key, file or field, or a label value the file does not map, stops the run with one line
naming the task file.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dtvg_scale.data.benchmark_tasks import SplitRule, TaskSpec, register_spec

CLASS_METRICS = ("accuracy", "f1", "f1_multiclass", "matthews_correlation", "pearson", "spearmanr")
ANSWER_METRICS = ("em", "f1")
KEYS = {"name", "files", "hub", "template", "label_field", "labels", "answer_field", "metrics"}
SPLITS = ("train", "validation", "test")


class TaskFileError(ValueError):
    """A task file that cannot define a task (one line naming the file and what is wrong)."""


def register_task_files(paths: Sequence[str]) -> list[str]:
    """Read, check and register every task file; returns the task names they define."""
    return [_register(Path(p)) for p in paths]


def _register(path: Path) -> str:
    spec = load_task_file(path)
    try:
        register_spec(spec)
    except ValueError as err:
        raise TaskFileError(str(err)) from err
    return spec.name


def load_task_file(path: Path) -> TaskSpec:
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TaskFileError(f"task file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise TaskFileError(f"task file {path} must hold a mapping (name, files or hub, template, ...)")

    def fail(message: str) -> TaskFileError:
        return TaskFileError(f"task file {path}: {message}")

    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(KEYS))}")
    for key in ("name", "template"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise fail(f"'{key}' (a string) is missing")
    name, template = raw["name"].strip(), raw["template"]
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if not fields:
        raise fail(f"the template {template!r} names no field ({{field}})")

    # where the data is: files, or a hub dataset
    files: tuple[tuple[str, str], ...] = ()
    hub_name, hub_config, rule = "", None, SplitRule("official", validation="validation", test="test")
    if ("files" in raw) == ("hub" in raw):
        raise fail("give either 'files' (local .jsonl/.csv per split) or 'hub' (a hub dataset), not both or neither")
    if "files" in raw:
        given = raw["files"]
        if not isinstance(given, dict) or not {"train", "validation"} <= set(given) or set(given) - set(SPLITS):
            raise fail("'files' maps train, validation (and test, for a target) to .jsonl or .csv files")
        resolved = []
        for split, file in given.items():
            file_path = (path.parent / str(file)).resolve()
            if file_path.suffix not in (".jsonl", ".json", ".csv"):
                raise fail(f"{split}: {file} is neither .jsonl nor .csv")
            if not file_path.is_file():
                raise fail(f"{split}: file not found: {file_path}")
            resolved.append((split, str(file_path)))
        files = tuple(resolved)
    else:
        hub = raw["hub"]
        if not isinstance(hub, dict) or not isinstance(hub.get("dataset"), str):
            raise fail("'hub' needs 'dataset' (and optionally 'config' and 'splits')")
        hub_name, hub_config = hub["dataset"], hub.get("config")
        splits = {**{s: s for s in SPLITS}, **(hub.get("splits") or {})}
        rule = SplitRule("official", train=splits["train"], validation=splits["validation"], test=splits["test"])

    # what the target is: a class word, or an answer
    if ("labels" in raw) == ("answer_field" in raw):
        raise fail("give either 'label_field' + 'labels' (classification) or 'answer_field' (generation)")
    metric_names = raw.get("metrics") or ["accuracy" if "labels" in raw else "f1"]
    if isinstance(metric_names, str):
        metric_names = [metric_names]
    allowed = CLASS_METRICS if "labels" in raw else ANSWER_METRICS
    bad = [m for m in metric_names if m not in allowed]
    if bad:
        kind = "a classification task" if "labels" in raw else "a generation task"
        raise fail(f"metric {bad[0]!r} is not one for {kind}; use {', '.join(allowed)}")
    if "labels" in raw:
        labels_map = raw["labels"]
        label_field = raw.get("label_field")
        if not isinstance(label_field, str):
            raise fail("'labels' needs 'label_field' (the field holding the class)")
        if not isinstance(labels_map, dict) or len(labels_map) < 2:
            raise fail("'labels' maps each value of the label field to its target word (two or more)")
        words = {str(k): str(v).strip() for k, v in labels_map.items()}
        if len(set(words.values())) != len(words) or not all(words.values()):
            raise fail("'labels' must give every class its own non-empty word")
        if "f1" in metric_names and len(words) != 2:
            raise fail("metric 'f1' is binary (of the second label); use f1_multiclass for more classes")
        fmt, labels, qa = _class_formatter(path, name, template, label_field, words), tuple(words.values()), False
    else:
        answer_field = raw["answer_field"]
        if not isinstance(answer_field, str):
            raise fail("'answer_field' must be a field name")
        fmt, labels, qa = _answer_formatter(path, name, template, answer_field), None, True
    return TaskSpec(name=name, prefix="", benchmark="", hub_name=hub_name, hub_config=hub_config, split_rule=rule,
                    format=fmt, labels=labels, metric_names=tuple(metric_names), reported_metric=metric_names[0],
                    qa=qa, files=files, defined_in=str(path))


def _fill(path: Path, name: str, template: str, row: dict[str, Any]) -> str:
    try:
        return template.format_map(row)
    except KeyError as err:
        raise TaskFileError(f"task file {path}: task {name!r}: the template names field {err.args[0]!r}, which its "
                            f"data does not have (fields: {', '.join(row)})") from None


def _class_formatter(path: Path, name: str, template: str, label_field: str, words: dict[str, str]):
    def fmt(row: dict[str, Any], compat: bool, is_train: bool):
        if label_field not in row:
            raise TaskFileError(f"task file {path}: task {name!r}: no field {label_field!r} in its data "
                                f"(fields: {', '.join(row)})")
        value = str(row[label_field])
        if value not in words:
            raise TaskFileError(f"task file {path}: task {name!r}: label value {value!r} is not in 'labels' "
                                f"({', '.join(words)})")
        return [(_fill(path, name, template, row), words[value], (), None)]

    return fmt


def _answer_formatter(path: Path, name: str, template: str, answer_field: str):
    def fmt(row: dict[str, Any], compat: bool, is_train: bool):
        if answer_field not in row:
            raise TaskFileError(f"task file {path}: task {name!r}: no field {answer_field!r} in its data "
                                f"(fields: {', '.join(row)})")
        value = row[answer_field]
        answers = tuple(str(a) for a in value) if isinstance(value, (list, tuple)) else (str(value),)
        if not answers:
            raise TaskFileError(f"task file {path}: task {name!r}: an example has no answer in {answer_field!r}")
        return [(_fill(path, name, template, row), answers[0], answers, None)]

    return fmt
