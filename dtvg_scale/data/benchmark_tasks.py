"""The paper's benchmark as data: GLUE, SuperGLUE, MRQA and four other tasks, text-to-text.

Why this module exists
----------------------
DTVG's numbers are only comparable with the papers' if every task is split, formatted and scored
the way the prior code does it. The authors' repository (zpy2477/DTVG) lacks its data module; its
protocol is ATTEMPT's (AkariAsai/ATTEMPT ``attempt/data/tasks.py``) as kept by DePT
(ZhengxiangShi/DePT ``src/tasks.py``). This module states that protocol as one declarative
:class:`TaskSpec` per task and loads it, from the hub or from local JSONL files, never falling
back to other data.

The protocol (checked against the prior code)
---------------------------------------------
* Text-to-text with the prior code's task name as the first word: ``"rte sentence1: ...
  sentence2: ..."`` -> ``"1"``. SuperGLUE tasks carry the prior code's names as prefix
  (``"superglue-cb premise: ..."``, ``"superglue-wsc.fixed text: ..."``; ReCoRD's source reads
  ``"superglue-record record query: ..."``) so prompts see what they saw in the papers.
* Split rules, all driven by ``torch.randperm`` with a generator seeded with ``split_seed`` (42):
  - small tasks (CoLA, RTE, MRPC, STS-B, BoolQ, CB, COPA, MultiRC, WiC, WSC, SuperGLUE-RTE,
    SciTail): train = the official train in file order; the official validation is permuted and
    split at ``n // 2``: validation = the first ``n // 2``, test = the rest, so an odd split gives
    the extra example to test (RTE 277 -> 138/139, CoLA 1043 -> 521/522);
  - large tasks (QQP, QNLI, SST-2, ReCoRD, SQuAD, the MRQA four, WinoGrande, Yelp): the official
    train is permuted; validation = its first 1000, train = the rest in permuted order; test = the
    official validation (Yelp: the official test), unshuffled;
  - MNLI: validation = validation_mismatched, test = validation_matched; PAWS: its own three
    splits. Neither is shuffled.
* A source task needs no test split (Stage I selects on validation; nothing reads a source's
  test), so ``with_test=False`` neither reads nor formats it: QQP is a source with its train
  alone. ``split_overrides`` replaces an official split name the rule would read, e.g.
  ``{"validation": "validation_matched"}`` for MNLI when validation_mismatched is not at hand:
  an explicit departure from the protocol, recorded in :attr:`TaskData.split_overrides`.
* ``max_train_samples`` = n: small/official tasks keep the first n of a ``split_seed``
  permutation of train, large ones the first n of their already permuted train (the prior
  code's ``subsample``). ``k_shot`` = K then draws K examples per class from that train (see
  :func:`_k_shot`).
* STS-B targets: the prior code's ``round_stsb_target`` computes ``np.round((x * 5) / 5, 1)``,
  i.e. rounds to 0.1, while its docstring and the papers (after T5) mean ``np.round(x * 5) / 5``,
  a 0.2 grid. ``compat_quirks=True`` keeps the 0.1 rounding, ``False`` uses the 0.2 grid.
* WinoGrande: the prior code writes ``option0: {option1} option1: {option1}`` (the second option
  is never shown); ``compat_quirks=False`` shows ``option2`` as ``option1:``.
* ReCoRD: one example per gold answer in train (the prior code's duplication). In validation and
  test the prior code duplicates too, so a query counts once per answer; ``compat_quirks=False``
  keeps one example per query there. Each example carries all gold answers for scoring.
* SQuAD and MRQA: question, context and answers pass through T5's ``pad_punctuation``; the
  target is the first gold answer and scoring takes the max over all gold answers.
* Decoder-only backbones: the source becomes ``f"{source} Label : "``, the exact string of
  zpy2477/DTVG ``run_seq2seq.py`` (``decoder_preprocess_function``).

Scores are fractions in 0..1 (see :mod:`dtvg_scale.data.metrics`).
"""

from __future__ import annotations

import glob
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import regex
import torch

from dtvg_scale.data import metrics
from dtvg_scale.data.examples import Example, TaskData

if TYPE_CHECKING:  # imported where a split is read: ~0.6 s at every start that most runs never need
    import datasets

__all__ = [
    "BENCHMARK_GROUPS",
    "TASK_NAMES",
    "TASK_SPECS",
    "BenchmarkExample",
    "MissingSplitError",
    "ProtocolError",
    "SplitRule",
    "TaskData",
    "TaskSpec",
    "format_rows",
    "get_spec",
    "load_benchmark_task",
    "pad_punctuation",
    "read_official_split",
    "register_spec",
    "score",
    "spec_names",
    "task_labels",
]

DECODER_ONLY_SUFFIX = " Label : "  # zpy2477/DTVG run_seq2seq.py: f"{x} Label : "
VALIDATION_FROM_TRAIN = 1000  # the prior code's validation size for large tasks


# ---------------------------------------------------------------- the data types


@dataclass(frozen=True)
class BenchmarkExample(Example):
    """An :class:`~dtvg_scale.data.examples.Example` that also carries what scoring needs and the
    text does not show: all gold ``answers`` (ReCoRD/SQuAD/MRQA) and the question ``group``
    (MultiRC's EM is per question). It is an ``Example``, so the pipeline sees source/target."""

    answers: tuple[str, ...] = ()
    group: str | None = None


class MissingSplitError(FileNotFoundError):
    """A split the task needs is not in the local folder (or not on the hub): never replaced."""


class ProtocolError(ValueError):
    """A request the task's protocol cannot honour (k-shot of a generative task, a bad split override)."""


@dataclass(frozen=True)
class SplitRule:
    """How the three splits come from the official ones.

    kind: ``halve_validation`` (small tasks), ``carve_train`` (large tasks) or ``official``.
    train/validation/test: official split names; for ``halve_validation`` ``validation`` is
    the one halved, for ``carve_train`` ``test`` is the official split used as test.
    """

    kind: str
    train: str = "train"
    validation: str = "validation"
    test: str = "validation"


SMALL = SplitRule("halve_validation")
LARGE = SplitRule("carve_train")

Formatter = Callable[[dict[str, Any], bool, bool], list[tuple[str, str, tuple[str, ...], str | None]]]
# (row, compat_quirks, is_train) -> [(source without prefix, target, answers, group), ...]


@dataclass(frozen=True)
class TaskSpec:
    """Everything that defines a task: where its data is, how it splits, formats and scores."""

    name: str
    prefix: str  # the prior code's task name, the first word of every source
    benchmark: str  # local folder: <local_dir>/<benchmark>/<local_name>/<split>.jsonl
    hub_name: str
    hub_config: str | None
    split_rule: SplitRule
    format: Formatter
    labels: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    reported_metric: str
    local_name: str = ""  # defaults to hub_config, else name
    stsb_labels: bool = field(default=False, repr=False)  # labels depend on compat_quirks
    qa: bool = False  # scored by SQuAD EM/F1, each prediction against all gold answers
    files: tuple[tuple[str, str], ...] = ()  # a task file's own data: (split, path of a .jsonl or .csv file)
    defined_in: str = ""  # the task file that defines it (empty: built in)

    @property
    def folder(self) -> str:
        return self.local_name or self.hub_config or self.name


# ---------------------------------------------------------------- formatting helpers


def pad_punctuation(text: str) -> str:
    """T5's ``_pad_punctuation``: spaces around every character that is not a letter, digit,
    mark, underscore or space, then whitespace collapsed (the SQuAD/MRQA inputs of the prior code)."""
    text = regex.sub(r"([^_\s\p{N}\p{L}\p{M}])", r" \1 ", str(text))
    return regex.sub(r"\s+", " ", text)


def _fields(*pairs: tuple[str, str]) -> Formatter:
    """The common template: ``"<key1> <row[field1]> <key2> <row[field2]> ..."`` -> str(label)."""

    def fmt(row: dict[str, Any], compat: bool, is_train: bool):
        parts = [text for key, name in pairs for text in (key, str(row[name]))]
        return [(" ".join(parts), str(row["label"]), (), None)]

    return fmt


def _stsb(row: dict[str, Any], compat: bool, is_train: bool):
    score = float(row["label"])
    # compat: the prior code's round_stsb_target, np.round((x * 5) / 5, 1) -- a 0.1 grid;
    # else what its docstring and the papers state: the nearest multiple of 0.2.
    rounded = np.round((score * 5) / 5, decimals=1) if compat else np.round(score * 5) / 5
    source = " ".join(["sentence1:", row["sentence1"], "sentence2:", row["sentence2"]])
    return [(source, str(float(rounded)), (), None)]


def _remove_markup(text: str) -> str:
    return regex.sub("<(/)?b>", "", regex.sub("<br>", " ", text))


def _multirc(row: dict[str, Any], compat: bool, is_train: bool):
    source = " ".join(["question:", _remove_markup(row["question"]), "answer:", _remove_markup(row["answer"]),
                       "paragraph:", _remove_markup(row["paragraph"])])
    return [(source, str(row["label"]), (), str(row["idx"]["question"]))]


def _mark_span(text: str, span: str, index: int, mark: str) -> str:
    """Put ``mark`` around ``span`` when it starts at word ``index`` (T5's WSC preprocessing)."""
    pattern = rf"^((?:\S+\s){{{index}}})({regex.escape(span)})"
    return regex.sub(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text)


def _wsc(row: dict[str, Any], compat: bool, is_train: bool):
    text = _mark_span(row["text"], row["span1_text"], row["span1_index"], "*")
    # the first mark added two words before the pronoun when the noun comes first
    span2_index = row["span2_index"] + 2 * int(row["span1_index"] < row["span2_index"])
    text = _mark_span(text, row["span2_text"], span2_index, "#")
    return [(f"text: {text}", str(row["label"]), (), None)]


def _record(row: dict[str, Any], compat: bool, is_train: bool):
    passage = regex.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", row["passage"])
    passage = regex.sub(r"\n@highlight\n", ". ", passage)
    source = f"record query: {row['query']} entities: {', '.join(row['entities'])} passage: {passage}"
    answers = tuple(row["answers"])
    if is_train or compat:  # one example per gold answer ("<unk>" when there is none)
        return [(source, answer, answers, None) for answer in (answers or ("<unk>",))]
    return [(source, answers[0] if answers else "<unk>", answers, None)]


def _qa(answers_of: Callable[[dict[str, Any]], Sequence[str]]) -> Formatter:
    """SQuAD/MRQA: ``question: ... context: ...`` -> the first gold answer, all padded as T5 does."""

    def fmt(row: dict[str, Any], compat: bool, is_train: bool):
        answers = tuple(pad_punctuation(a) for a in answers_of(row))
        source = " ".join(["question:", pad_punctuation(row["question"]), "context:", pad_punctuation(row["context"])])
        return [(source, answers[0] if answers else "", answers, None)]

    return fmt


def _winogrande(row: dict[str, Any], compat: bool, is_train: bool):
    second = row["option1"] if compat else row["option2"]  # the prior code never shows option2
    source = " ".join(["sentence:", row["sentence"], "option0:", row["option1"], "option1:", second])
    return [(source, str(int(row["answer"]) - 1), (), None)]


def _scitail(row: dict[str, Any], compat: bool, is_train: bool):
    target = {"entailment": "0", "neutral": "1"}[row["gold_label"]]
    return [(" ".join(["premise:", row["sentence1"], "hypothesis:", row["sentence2"]]), target, (), None)]


def _yelp(row: dict[str, Any], compat: bool, is_train: bool):
    return [(" ".join(["sentence:", row["text"]]), str(row["label"]), (), None)]


# ---------------------------------------------------------------- the registry

_BINARY = ("0", "1")
_ACC = ("accuracy",)
_QA_METRICS = ("f1", "em")
_PREMISE = _fields(("premise:", "premise"), ("hypothesis:", "hypothesis"))
_SENTENCE_PAIR = _fields(("sentence1:", "sentence1"), ("sentence2:", "sentence2"))
_GLUE, _SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
_MNLI_SPLITS = SplitRule("official", validation="validation_mismatched", test="validation_matched")


def _spec(name, prefix, benchmark, hub, config, rule, fmt, labels, metric_names, reported, **kw) -> TaskSpec:
    return TaskSpec(name, prefix, benchmark, hub, config, rule, fmt, labels, metric_names, reported, **kw)


_SPECS = [
    # GLUE
    _spec("mnli", "mnli", "glue", _GLUE, "mnli", _MNLI_SPLITS, _PREMISE, ("0", "1", "2"), _ACC, "accuracy"),
    _spec("qqp", "qqp", "glue", _GLUE, "qqp", LARGE, _fields(("question1:", "question1"), ("question2:", "question2")),
          _BINARY, ("accuracy", "f1"), "accuracy"),
    _spec("qnli", "qnli", "glue", _GLUE, "qnli", LARGE, _fields(("question:", "question"), ("sentence:", "sentence")),
          _BINARY, _ACC, "accuracy"),
    _spec("sst2", "sst2", "glue", _GLUE, "sst2", LARGE, _fields(("sentence:", "sentence")), _BINARY, _ACC, "accuracy"),
    _spec("stsb", "stsb", "glue", _GLUE, "stsb", SMALL, _stsb, None, ("pearson", "spearmanr"), "pearson",
          stsb_labels=True),
    _spec("mrpc", "mrpc", "glue", _GLUE, "mrpc", SMALL, _SENTENCE_PAIR, _BINARY, ("accuracy", "f1"), "accuracy"),
    _spec("rte", "rte", "glue", _GLUE, "rte", SMALL, _SENTENCE_PAIR, _BINARY, _ACC, "accuracy"),
    _spec("cola", "cola", "glue", _GLUE, "cola", SMALL, _fields(("sentence:", "sentence")), _BINARY,
          ("matthews_correlation",), "matthews_correlation"),
    # SuperGLUE
    _spec("boolq", "superglue-boolq", "super_glue", _SUPERGLUE, "boolq", SMALL,
          _fields(("question:", "question"), ("passage:", "passage")), _BINARY, _ACC, "accuracy"),
    _spec("cb", "superglue-cb", "super_glue", _SUPERGLUE, "cb", SMALL, _PREMISE, ("0", "1", "2"),
          ("accuracy", "f1_multiclass"), "accuracy"),
    _spec("copa", "superglue-copa", "super_glue", _SUPERGLUE, "copa", SMALL,
          _fields(("premise:", "premise"), ("choice1:", "choice1"), ("choice2:", "choice2")), _BINARY, _ACC,
          "accuracy"),
    _spec("multirc", "superglue-multirc", "super_glue", _SUPERGLUE, "multirc", SMALL, _multirc, _BINARY,
          ("f1", "em"), "f1"),
    _spec("wic", "superglue-wic", "super_glue", _SUPERGLUE, "wic", SMALL,
          _fields(("sentence1:", "sentence1"), ("sentence2:", "sentence2"), ("word:", "word")), _BINARY, _ACC,
          "accuracy"),
    _spec("wsc", "superglue-wsc.fixed", "super_glue", _SUPERGLUE, "wsc.fixed", SMALL, _wsc, _BINARY, _ACC, "accuracy"),
    _spec("record", "superglue-record", "super_glue", _SUPERGLUE, "record", LARGE, _record, None, _QA_METRICS, "f1",
          qa=True),
    _spec("superglue-rte", "superglue-rte", "super_glue", _SUPERGLUE, "rte", SMALL, _PREMISE, _BINARY, _ACC,
          "accuracy"),
    # MRQA (SQuAD from the SQuAD hub dataset; the other four as DePT loads them)
    _spec("squad", "squad", "mrqa", "rajpurkar/squad", None, LARGE, _qa(lambda r: r["answers"]["text"]), None,
          _QA_METRICS, "f1", qa=True),
    _spec("nq", "nq", "mrqa", "lucadiliello/naturalquestionsshortqa", None, LARGE, _qa(lambda r: r["answers"]), None,
          _QA_METRICS, "f1", qa=True),
    _spec("hotpotqa", "hotpotqa", "mrqa", "lucadiliello/hotpotqa", None, LARGE, _qa(lambda r: r["answers"]), None,
          _QA_METRICS, "f1", qa=True),
    _spec("searchqa", "searchqa", "mrqa", "lucadiliello/searchqa", None, LARGE, _qa(lambda r: r["answers"]), None,
          _QA_METRICS, "f1", qa=True),
    _spec("newsqa", "newsqa", "mrqa", "lucadiliello/newsqa", None, LARGE, _qa(lambda r: r["answers"]), None,
          _QA_METRICS, "f1", qa=True),
    # Others
    _spec("winogrande", "winogrande", "other", "allenai/winogrande", "winogrande_xl", LARGE, _winogrande, _BINARY,
          _ACC, "accuracy", local_name="winogrande"),
    _spec("yelp_polarity", "yelp_polarity", "other", "fancyzhx/yelp_polarity", None,
          SplitRule("carve_train", test="test"), _yelp, _BINARY, _ACC, "accuracy"),
    _spec("scitail", "scitail", "other", "allenai/scitail", "snli_format", SMALL, _scitail, _BINARY, _ACC, "accuracy",
          local_name="scitail"),
    _spec("paws", "paws", "other", "google-research-datasets/paws", "labeled_final",
          SplitRule("official", validation="validation", test="test"), _SENTENCE_PAIR, _BINARY, _ACC, "accuracy",
          local_name="paws"),
    # Beyond the paper's 26: movie-review polarity (Pang & Lee 2005), SST-2's sentences' sibling, so SST-2
    # is the obvious helpful source; the hub dataset's own train/validation/test, SST-2's template
    _spec("rotten_tomatoes", "rotten_tomatoes", "other", "cornell-movie-review-data/rotten_tomatoes", None,
          SplitRule("official", validation="validation", test="test"), _fields(("sentence:", "text")), _BINARY, _ACC,
          "accuracy", local_name="rotten_tomatoes"),
]

TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
TASK_NAMES: tuple[str, ...] = tuple(TASK_SPECS)
# tasks defined by the user's task files (dtvg_scale.data.task_files), registered for this process
_USER_SPECS: dict[str, TaskSpec] = {}

BENCHMARK_GROUPS: dict[str, tuple[str, ...]] = {
    # the columns of the papers' tables (ATTEMPT/MPT/DePT/DTVG), in their order
    "GLUE": ("mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola"),
    "SuperGLUE": ("multirc", "boolq", "wic", "wsc", "cb"),
    "MRQA": ("nq", "hotpotqa", "searchqa", "newsqa"),
    "Others": ("winogrande", "yelp_polarity", "scitail", "paws"),
}

_STSB_LABELS_COMPAT = tuple(f"{i / 10:.1f}" for i in range(51))  # every 0.1 step, 0.0..5.0
_STSB_LABELS_PAPER = tuple(str(float(np.round(x, 1))) for x in np.arange(0, 5.2, 0.2))  # the prior code's labels_list


def get_spec(name: str) -> TaskSpec:
    """The task's spec (built in or from a task file); an unknown name raises ValueError listing the known ones."""
    spec = TASK_SPECS.get(name) or _USER_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown benchmark task {name!r}; known tasks: {', '.join(spec_names())}")
    return spec


def spec_names() -> tuple[str, ...]:
    """The paper's tasks, Rotten Tomatoes, then those of the task files registered here."""
    return TASK_NAMES + tuple(_USER_SPECS)


def register_spec(spec: TaskSpec) -> None:
    """Make a task file's task known to this process (idempotent for the same definition)."""
    if spec.name in TASK_SPECS:
        raise ProtocolError(f"task file {spec.defined_in}: {spec.name!r} is a built-in task; give the task another name")
    known = _USER_SPECS.get(spec.name)
    if known is not None and known.defined_in != spec.defined_in:
        raise ProtocolError(f"task {spec.name!r} is defined twice: in {known.defined_in} and {spec.defined_in}")
    _USER_SPECS[spec.name] = spec


def task_labels(name: str, compat_quirks: bool = True) -> tuple[str, ...] | None:
    """The class target strings (STS-B: every value its rounding can produce)."""
    spec = get_spec(name)
    if spec.stsb_labels:
        return _STSB_LABELS_COMPAT if compat_quirks else _STSB_LABELS_PAPER
    return spec.labels


# ---------------------------------------------------------------- loading


def _local_files(spec: TaskSpec, split: str, local_dir: str) -> tuple[list[str], str]:
    folder = Path(local_dir).expanduser().absolute() / spec.benchmark / spec.folder  # as given: messages name it
    single = folder / f"{split}.jsonl"
    if single.is_file():
        return [str(single)], str(single)
    shards = sorted(glob.glob(str(folder / f"{split}-*.jsonl")))
    return shards, f"{single} (or shards {folder / f'{split}-*.jsonl'})"


def read_official_split(name: str, split: str, local_dir: str | None, purpose: str = "") -> datasets.Dataset:
    """One official split of a task, unformatted, in hub schema.

    With ``local_dir``: ``<local_dir>/<benchmark>/<task>/<split>.jsonl`` (or its shards
    ``<split>-*.jsonl``) through the packaged ``json`` builder, which reads local files only.
    Otherwise ``datasets.load_dataset(hub_name, hub_config, split=split)``. A missing split raises
    :class:`MissingSplitError` naming the task, the split and where it was looked for;
    ``purpose`` (e.g. "the test split") is added to the message.
    """
    import datasets

    spec = get_spec(name)
    wanted = f"split {split!r}" + (f" (for {purpose})" if purpose else "")
    if spec.files:  # a task file's own files, wherever they are
        path = dict(spec.files).get(split)
        if path is None or not Path(path).is_file():
            where = f"{path} does not exist" if path else f"its task file {spec.defined_in} names no file for it"
            raise MissingSplitError(f"task {name!r}: {wanted} not found: {where}. No other data is used in its place.")
        builder = "csv" if path.endswith(".csv") else "json"
        return datasets.load_dataset(builder, data_files={split: [path]}, split=split)
    if local_dir is not None:
        files, looked_at = _local_files(spec, split, local_dir)
        if not files:
            raise MissingSplitError(f"task {name!r}: {wanted} not found; looked for {looked_at}. "
                                    f"No other data is used in its place.")
        return datasets.load_dataset("json", data_files={split: files}, split=split)
    try:
        return datasets.load_dataset(spec.hub_name, spec.hub_config, split=split)
    except ValueError as err:  # datasets raises ValueError for an unknown split
        where = spec.hub_name + (f" (config {spec.hub_config})" if spec.hub_config else "")
        raise MissingSplitError(f"task {name!r}: {wanted} could not be loaded from hub dataset {where}: {err}") from err


def seeded_permutation(n: int, seed: int) -> list[int]:
    """The prior code's ``shuffled_indices``: ``torch.randperm`` with a generator seeded ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def format_rows(name: str, rows: Sequence[dict[str, Any]], *, compat_quirks: bool = True, decoder_only: bool = False,
                is_train: bool = False) -> list[BenchmarkExample]:
    """Hub-schema rows -> examples: prefix, template, target(s), and the decoder-only suffix."""
    spec = get_spec(name)
    examples = []
    for row in rows:
        for body, target, answers, group in spec.format(row, compat_quirks, is_train):
            source = f"{spec.prefix} {body}" if spec.prefix else body  # a task file's template is the whole input
            if decoder_only:
                source = f"{source}{DECODER_ONLY_SUFFIX}"
            examples.append(BenchmarkExample(source, target, answers, group))
    return examples


def _class_of(name: str, target: str) -> str:
    if name == "stsb":  # DePT's few-shot sampler binarises STS-B at 2.5
        return "0" if float(target) <= 2.5 else "1"
    return target


def _k_shot(name: str, train: list[BenchmarkExample], k: int, seed: int, labels: tuple[str, ...] | None
            ) -> list[BenchmarkExample]:
    """K examples per class, class-balanced: walk train in the order ``Dataset.shuffle(seed)``
    would give (``np.random.default_rng(seed).permutation``, as DePT's sampler does) and keep an
    example while its class has fewer than K. A class with fewer than K examples gives them all."""
    if labels is None:
        raise ProtocolError(f"k_shot needs a classification task; {name!r} is generative")
    if k < 1:
        raise ProtocolError(f"k_shot must be >= 1, got {k}")
    classes = ("0", "1") if name == "stsb" else labels
    taken = dict.fromkeys(classes, 0)
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(train)).tolist():
        cls = _class_of(name, train[i].target)
        if taken.get(cls, k) < k:
            taken[cls] += 1
            chosen.append(train[i])
        if all(v >= k for v in taken.values()):
            break
    return chosen


def load_benchmark_task(name: str, *, local_dir: str | None, split_seed: int = 42, seed: int = 0,
                        k_shot: int | None = None, max_train_samples: int | None = None,
                        compat_quirks: bool = True, decoder_only: bool = False, with_test: bool = True,
                        split_overrides: dict[str, str] | None = None) -> TaskData:
    """The task's train/validation/test under the ATTEMPT/DePT split rules (module docstring).

    ``local_dir`` None reads the hub; a folder reads ``<local_dir>/<benchmark>/<task>/<split>.jsonl``
    and nothing else. Every official split the rule needs must exist: a missing one raises
    :class:`MissingSplitError`, even when the other splits are there. ``with_test=False`` (a
    source) leaves ``test`` empty and reads no official split for it; ``split_overrides`` maps a
    split of the rule (``train``, ``validation``, ``test``) to the official split to read instead.
    """
    spec = get_spec(name)
    rule = _overridden(name, spec.split_rule, split_overrides or {}, with_test)
    official: dict[str, datasets.Dataset] = {}

    def read(split: str, purpose: str) -> datasets.Dataset:
        if split not in official:
            try:
                official[split] = read_official_split(name, split, local_dir, purpose)
            except MissingSplitError as err:
                raise MissingSplitError(f"{err}{_override_hint(name, rule, split, local_dir)}") from err
        return official[split]

    if rule.kind == "halve_validation":
        train_ds = read(rule.train, "the train split")
        pool = read(rule.validation, "the validation and test splits, halved")
        order = seeded_permutation(len(pool), split_seed)
        half = len(pool) // 2
        validation_ds, test_ds = pool.select(order[:half]), pool.select(order[half:])
        train_order = list(range(len(train_ds)))
        shuffled_train = False
    elif rule.kind == "carve_train":
        pool = read(rule.train, f"the train split and {VALIDATION_FROM_TRAIN} validation examples")
        test_ds = read(rule.test, "the test split") if with_test else None
        order = seeded_permutation(len(pool), split_seed)
        train_ds, validation_ds = pool, pool.select(order[:VALIDATION_FROM_TRAIN])
        train_order = order[VALIDATION_FROM_TRAIN:]
        shuffled_train = True
    elif rule.kind == "official":
        train_ds = read(rule.train, "the train split")
        validation_ds = read(rule.validation, "the validation split")
        test_ds = read(rule.test, "the test split") if with_test else None
        train_order = list(range(len(train_ds)))
        shuffled_train = False
    else:
        raise ValueError(f"task {name!r}: unknown split rule {rule.kind!r}")

    if max_train_samples is not None:
        if not shuffled_train:  # the prior code's subsample: a split_seed permutation, then the first n
            train_order = seeded_permutation(len(train_order), split_seed)
        train_order = train_order[:max_train_samples]
    train_rows = train_ds.select(train_order)

    fmt = {"compat_quirks": compat_quirks, "decoder_only": decoder_only}
    train = format_rows(name, train_rows.to_list(), is_train=True, **fmt)
    validation = format_rows(name, validation_ds.to_list(), **fmt)
    test = format_rows(name, test_ds.to_list(), **fmt) if with_test else []
    labels = task_labels(name, compat_quirks)
    if k_shot is not None:
        train = _k_shot(name, train, k_shot, seed, labels)

    sizes = {"train": len(train), "validation": len(validation), "test": len(test)}
    sizes.update({f"{split}_rows": len(ds) for split, ds in official.items()})
    return TaskData(name=name, train=train, validation=validation, test=test, labels=labels,
                    metric_names=spec.metric_names, reported_metric=spec.reported_metric, split_sizes=sizes,
                    split_overrides=dict(split_overrides or {}))


def _override_hint(name: str, rule: SplitRule, missing: str, local_dir: str | None) -> str:
    """How to read another split in the missing one's place, explicitly (never done silently)."""
    role = next((r for r in _OVERRIDABLE[rule.kind] if getattr(rule, r) == missing), None)
    if role is None or get_spec(name).files:  # a task file names its files itself
        return ""
    hint = f" To read another official split in its place, say so: data.split_overrides=[{name}.{role}=SPLIT]"
    if local_dir is not None:
        folder = Path(local_dir).expanduser() / get_spec(name).benchmark / get_spec(name).folder
        present = sorted({f.name.split(".jsonl")[0].split("-")[0] for f in folder.glob("*.jsonl")} - {missing})
        hint += f" (present there: {', '.join(present) or 'none'})"
    return hint + "."


# which splits of a rule name an official split that can be swapped for another
_OVERRIDABLE = {"halve_validation": ("train", "validation"), "carve_train": ("train", "test"),
                "official": ("train", "validation", "test")}


def _overridden(name: str, rule: SplitRule, overrides: dict[str, str], with_test: bool) -> SplitRule:
    """The rule with some official split names replaced; refuses what would break the protocol's
    meaning (a split the rule does not read, or a test split that is also the validation one)."""
    allowed = _OVERRIDABLE[rule.kind]
    for split in overrides:
        if split not in allowed:
            raise ProtocolError(f"task {name!r}: split {split!r} cannot be overridden; its rule ({rule.kind}) "
                                f"reads official splits only for {', '.join(allowed)}")
    rule = replace(rule, **overrides)
    if with_test and rule.kind == "official" and rule.validation == rule.test:
        raise ProtocolError(f"task {name!r}: validation and test would both be the official {rule.test!r} split; "
                            f"model selection would see the test set")
    return rule


# ---------------------------------------------------------------- scoring


def _answers(example: Example) -> tuple[str, ...]:
    return tuple(getattr(example, "answers", ())) or (example.target,)


def score(task_name: str, predictions: list[str], examples: list[Example]) -> dict[str, float]:
    """All of the task's metrics (fractions, 0..1), plus ``"mean"``: their mean, which model
    selection uses (the prior code's ``average_metrics``). The reported metric is among them,
    under its own name. Predictions and targets are stripped first, as the prior code's
    post-processor does."""
    spec = get_spec(task_name)
    if len(predictions) != len(examples):
        raise ValueError(f"{task_name}: {len(predictions)} predictions for {len(examples)} examples")
    preds = [p.strip() for p in predictions]
    targets = [e.target.strip() for e in examples]
    values: dict[str, float] = {}
    if spec.qa:
        values.update(metrics.squad_em_f1(preds, [_answers(e) for e in examples]))
    for metric in spec.metric_names:
        if metric in values:
            continue
        if metric == "accuracy":
            values[metric] = metrics.accuracy(preds, targets)
        elif metric == "f1" and task_name == "multirc":
            values[metric] = metrics.multirc_f1(preds, targets)
        elif metric == "f1":  # of the second label (built-in tasks: "1"; a task file's: the second it lists)
            negative, positive = spec.labels if spec.labels and len(spec.labels) == 2 else ("0", "1")
            values[metric] = metrics.binary_f1(preds, targets, positive=positive, negative=negative)
        elif metric == "em":  # MultiRC: all options of a question right
            groups = [getattr(e, "group", None) for e in examples]
            if any(g is None for g in groups):
                raise ValueError(f"{task_name}: EM is grouped by question; pass the BenchmarkExamples "
                                 f"load_benchmark_task made (they carry the question id)")
            values[metric] = metrics.grouped_exact_match(preds, targets, groups)
        elif metric == "matthews_correlation":
            values[metric] = metrics.matthews(preds, targets)
        elif metric == "pearson":
            values[metric] = metrics.pearson(preds, targets)
        elif metric == "spearmanr":
            values[metric] = metrics.spearman(preds, targets)
        elif metric == "f1_multiclass":
            values[metric] = metrics.macro_f1(preds, targets, spec.labels or ())
        else:  # a spec naming a metric nobody computes is a bug here, not the user's
            raise AssertionError(f"{task_name}: no implementation for metric {metric!r}")
    result = {m: values[m] for m in spec.metric_names}
    result["mean"] = statistics.fmean(result[m] for m in spec.metric_names)
    return result
