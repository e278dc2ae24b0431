"""The benchmark registry: formats, split rules, missing data, few-shot, decoder-only, scoring.

Formats are checked on the first real row of each GLUE/SuperGLUE file in shared/data (the
repository is cloned with ``shared/`` beside it) and on hand-written hub-schema rows for the
tasks that have no local copy. Expected strings were derived from the prior code's templates
(ATTEMPT ``attempt/data/tasks.py`` / DePT ``src/tasks.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtvg_scale.data import benchmark_tasks as bt
from dtvg_scale.data.examples import Example

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data folder {DATA} is absent (clone shared/ beside the repo)")


def first_row(relative: str) -> dict:
    with open(DATA / relative) as handle:
        return json.loads(handle.readline())


def read_rows(relative: str) -> list[dict]:
    with open(DATA / relative) as handle:
        return [json.loads(line) for line in handle]


def one(name: str, row: dict, **kwargs) -> bt.BenchmarkExample:
    (example,) = bt.format_rows(name, [row], **kwargs)
    return example


# ------------------------------------------------------------------ registry


def test_registry_names_groups_and_unknown_name():
    assert set(bt.TASK_NAMES) == {
        "mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola", "boolq", "cb", "copa", "multirc", "wic", "wsc",
        "record", "superglue-rte", "squad", "nq", "hotpotqa", "searchqa", "newsqa", "winogrande", "yelp_polarity",
        "scitail", "paws", "rotten_tomatoes",
    }
    assert set(bt.BENCHMARK_GROUPS) == {"GLUE", "SuperGLUE", "MRQA", "Others"}
    assert bt.BENCHMARK_GROUPS["SuperGLUE"] == ("multirc", "boolq", "wic", "wsc", "cb")
    for names in bt.BENCHMARK_GROUPS.values():
        assert set(names) <= set(bt.TASK_NAMES)
    for spec in bt.TASK_SPECS.values():
        assert spec.reported_metric in spec.metric_names
    with pytest.raises(ValueError, match="unknown benchmark task 'glue-rte'.*known tasks: mnli, qqp"):
        bt.load_benchmark_task("glue-rte", local_dir=None)
    with pytest.raises(ValueError, match="known tasks"):
        bt.score("nope", [], [])


# ------------------------------------------------------------------ formats on real rows

REAL = [
    ("cola", "glue/cola/train.jsonl",
     "cola sentence: Our friends won't buy this analysis, let alone the next one we propose.", "1"),
    ("sst2", "glue/sst2/validation.jsonl", "sst2 sentence: it 's a charming and often affecting journey . ", "1"),
    ("mrpc", "glue/mrpc/validation.jsonl",
     ("mrpc sentence1: He said the foodservice pie business doesn 't fit the company 's long-term growth strategy . "
      "sentence2: \" The foodservice pie business does not fit our long-term growth strategy ."), "1"),
    ("qqp", "glue/qqp/train.jsonl",
     ("qqp question1: How do I get inside University College London being an Indian? question2: Which is better, "
      "masters in computer science at Arizona State University or University College London for a foreigner "
      "(Indian National)?"), "0"),
    ("qnli", "glue/qnli/validation.jsonl",
     ("qnli question: What came into force after the new constitution was herald? sentence: As of that day, the new "
      "constitution heralding the Second Republic came into force."), "0"),
    ("mnli", "glue/mnli/validation_matched.jsonl",
     "mnli premise: The new rights are nice enough hypothesis: Everyone really likes the newest benefits ", "1"),
    ("stsb", "glue/stsb/validation.jsonl",
     "stsb sentence1: A man with a hard hat is dancing. sentence2: A man wearing a hard hat is dancing.", "5.0"),
    ("rte", "glue/rte/validation.jsonl",
     ("rte sentence1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
      "according to the Christopher Reeve Foundation. sentence2: Christopher Reeve had an accident."), "1"),
    ("superglue-rte", "super_glue/rte/validation.jsonl",
     ("superglue-rte premise: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
      "according to the Christopher Reeve Foundation. hypothesis: Christopher Reeve had an accident."), "1"),
    ("cb", "super_glue/cb/validation.jsonl",
     ("superglue-cb premise: Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his "
      "own portion of titanic anatomy to shaft? Did he think he was helping? hypothesis: Valence was helping"), "1"),
    ("copa", "super_glue/copa/validation.jsonl",
     ("superglue-copa premise: The man turned on the faucet. choice1: The toilet filled with water. "
      "choice2: Water flowed from the spout."), "1"),
    ("wic", "super_glue/wic/validation.jsonl",
     ("superglue-wic sentence1: An emerging professional class. sentence2: Apologizing for losing your temper, even "
      "though you were badly provoked, showed real class. word: class"), "0"),
    ("wsc", "super_glue/wsc.fixed/validation.jsonl",
     ("superglue-wsc.fixed text: Bernard , who had not told the government official that he was less than 21 when "
      "he filed for a homestead claim, did not consider that he had done anything dishonest. Still, * anyone * who "
      "knew that he was 19 years old could take his claim away from # him # ."), "0"),
]


@needs_data
@pytest.mark.parametrize("name, relative, source, target", REAL, ids=[r[0] for r in REAL])
def test_format_of_a_real_row(name, relative, source, target):
    example = one(name, first_row(relative))
    assert (example.source, example.target) == (source, target)


@needs_data
def test_format_of_real_boolq_and_multirc_rows():
    boolq = one("boolq", first_row("super_glue/boolq/validation.jsonl"))
    assert boolq.source.startswith("superglue-boolq question: does ethanol take more energy make that produces "
                                   "passage: Ethanol fuel -- All biomass goes through")
    assert boolq.target == "0"
    multirc = one("multirc", first_row("super_glue/multirc/validation.jsonl"))
    assert multirc.source.startswith(
        "superglue-multirc question: Would the mass of a baseball affect how much force you have to use to pick it "
        "up? answer: No paragraph: What causes a change in motion? The application of a force.")
    assert (multirc.target, multirc.group) == ("0", "0")


# ------------------------------------------------------------------ formats on recorded hub rows


def test_multirc_strips_markup():
    row = {"paragraph": "<b>Sent 1: </b>A cat.<br><b>Sent 2: </b>It sat.", "question": "Who <b>sat</b>?",
           "answer": "The cat", "idx": {"paragraph": 3, "question": 17, "answer": 2}, "label": 1}
    example = one("multirc", row)
    assert example.source == ("superglue-multirc question: Who sat? answer: The cat "
                              "paragraph: Sent 1: A cat. Sent 2: It sat.")
    assert (example.target, example.group) == ("1", "17")


RECORD = {
    "passage": "The cat sat on the mat.\n@highlight\nCats like mats\n@highlight\nDogs do not",
    "query": "@placeholder sat on the mat", "entities": ["cat", "Cats", "Dogs"],
    "entity_spans": {"text": ["cat", "Cats", "Dogs"], "start": [4, 24, 39], "end": [7, 28, 43]},
    "answers": ["cat", "Cats"], "idx": {"passage": 0, "query": 0},
}
RECORD_SOURCE = ("superglue-record record query: @placeholder sat on the mat entities: cat, Cats, Dogs "
                 "passage: The cat sat on the mat. Cats like mats. Dogs do not")


def test_record_one_train_example_per_gold_answer():
    train = bt.format_rows("record", [RECORD], is_train=True)
    assert [(e.source, e.target, e.answers) for e in train] == [
        (RECORD_SOURCE, "cat", ("cat", "Cats")), (RECORD_SOURCE, "Cats", ("cat", "Cats"))]
    assert len(bt.format_rows("record", [RECORD])) == 2  # the prior code duplicates evaluation rows too
    (single,) = bt.format_rows("record", [RECORD], compat_quirks=False)
    assert (single.target, single.answers) == ("cat", ("cat", "Cats"))


def test_squad_and_mrqa_rows():
    squad = {"id": "56be4db0acb8001400a502ec", "title": "Super_Bowl_50",
             "context": "The Denver Broncos defeated the Carolina Panthers 24-10.",
             "question": "Which NFL team won Super Bowl 50?",
             "answers": {"text": ["Denver Broncos", "the Denver Broncos."], "answer_start": [4, 0]}}
    example = one("squad", squad)
    assert example.source == ("squad question: Which NFL team won Super Bowl 50 ?  context: The Denver Broncos "
                              "defeated the Carolina Panthers 24 - 10 . ")
    assert example.target == "Denver Broncos"
    assert example.answers == ("Denver Broncos", "the Denver Broncos . ")
    nq = {"context": "Paris is the capital of France.", "question": "capital of france", "answers": ["Paris"],
          "key": "k", "labels": [{"start": [0], "end": [4]}]}
    assert (one("nq", nq).source, one("nq", nq).target) == (
        "nq question: capital of france context: Paris is the capital of France . ", "Paris")


def test_winogrande_quirk_and_fix():
    row = {"sentence": "Ian volunteered to eat Dennis's menudo because _ liked tripe.", "option1": "Ian",
           "option2": "Dennis", "answer": "1"}
    assert one("winogrande", row).source == ("winogrande sentence: Ian volunteered to eat Dennis's menudo because _ "
                                             "liked tripe. option0: Ian option1: Ian")
    assert one("winogrande", row, compat_quirks=False).source.endswith("option0: Ian option1: Dennis")
    assert one("winogrande", row).target == "0"


def test_other_tasks_rows():
    yelp = one("yelp_polarity", {"text": "Great tacos.", "label": 1})
    assert (yelp.source, yelp.target) == ("yelp_polarity sentence: Great tacos.", "1")
    scitail = one("scitail", {"sentence1_binary_parse": "", "sentence1_parse": "", "sentence1": "Plants need light.",
                              "sentence2_parse": "", "sentence2": "Light helps plants.", "annotator_labels": [],
                              "gold_label": "neutral"})
    assert (scitail.source, scitail.target) == (
        "scitail premise: Plants need light. hypothesis: Light helps plants.", "1")
    paws = one("paws", {"id": 1, "sentence1": "A b.", "sentence2": "B a.", "label": 0})
    assert (paws.source, paws.target) == ("paws sentence1: A b. sentence2: B a.", "0")


def test_stsb_rounding_compat_and_paper():
    def target(label: float, compat: bool) -> str:
        return one("stsb", {"sentence1": "a", "sentence2": "b", "label": label, "idx": 0}, compat_quirks=compat).target

    # the prior code: np.round((x * 5) / 5, 1), a 0.1 grid; the papers: the nearest multiple of 0.2
    assert [target(x, True) for x in (2.3, 3.5, 3.8, 0.0, 5.0)] == ["2.3", "3.5", "3.8", "0.0", "5.0"]
    assert [target(x, False) for x in (2.3, 3.5, 3.8, 0.0, 5.0)] == ["2.4", "3.6", "3.8", "0.0", "5.0"]
    assert len(bt.task_labels("stsb", True)) == 51 and len(bt.task_labels("stsb", False)) == 26


def test_decoder_only_appends_the_authors_label_cue():
    row = {"sentence1": "A.", "sentence2": "B.", "label": 0, "idx": 0}
    plain, decoder = one("rte", row), one("rte", row, decoder_only=True)
    assert decoder.source == plain.source + " Label : " == "rte sentence1: A. sentence2: B. Label : "
    assert decoder.target == plain.target == "0"


# ------------------------------------------------------------------ split rules on real files


@needs_data
@pytest.mark.parametrize("name, train, validation, test", [
    ("rte", 2490, 138, 139), ("cb", 250, 28, 28), ("mrpc", 3668, 204, 204), ("cola", 8551, 521, 522),
    ("stsb", 5749, 750, 750),
])
def test_small_task_split_sizes(name, train, validation, test):
    data = bt.load_benchmark_task(name, local_dir=str(DATA))
    assert (len(data.train), len(data.validation), len(data.test)) == (train, validation, test)
    assert data.split_sizes == {"train": train, "validation": validation, "test": test,
                                "train_rows": train, "validation_rows": validation + test}


@needs_data
def test_small_task_split_is_the_prior_codes_permutation():
    data = bt.load_benchmark_task("rte", local_dir=str(DATA), split_seed=42)
    rows = read_rows("glue/rte/validation.jsonl")
    generator = torch.Generator()
    generator.manual_seed(42)
    order = torch.randperm(len(rows), generator=generator).tolist()
    expected = bt.format_rows("rte", [rows[i] for i in order])
    assert data.validation == expected[:138] and data.test == expected[138:]
    train_rows = read_rows("glue/rte/train.jsonl")
    assert data.train == bt.format_rows("rte", train_rows)  # train keeps file order
    other = bt.load_benchmark_task("rte", local_dir=str(DATA), split_seed=7)
    assert other.validation != data.validation and sorted(map(repr, other.validation + other.test)) == sorted(
        map(repr, data.validation + data.test))


@needs_data
def test_large_task_carves_validation_out_of_train():
    data = bt.load_benchmark_task("qnli", local_dir=str(DATA))  # the local train is a real 9,999-row subset
    assert data.split_sizes == {"train": 8999, "validation": 1000, "test": 5463, "train_rows": 9999,
                                "validation_rows": 5463}
    assert not {e.source for e in data.validation} & {e.source for e in data.train}
    assert data.test[0].source.startswith("qnli question: What came into force after the new constitution")


@needs_data
def test_max_train_samples_takes_a_seeded_prefix():
    data = bt.load_benchmark_task("rte", local_dir=str(DATA), max_train_samples=10)
    rows = read_rows("glue/rte/train.jsonl")
    generator = torch.Generator()
    generator.manual_seed(42)
    order = torch.randperm(len(rows), generator=generator).tolist()[:10]
    assert data.train == bt.format_rows("rte", [rows[i] for i in order])
    assert data.split_sizes["train"] == 10 and len(data.test) == 139


@needs_data
@pytest.mark.parametrize("name, split, path", [
    ("qqp", "validation", "glue/qqp/validation.jsonl"),
    ("mnli", "validation_mismatched", "glue/mnli/validation_mismatched.jsonl"),
    ("boolq", "train", "super_glue/boolq/train.jsonl"),
])
def test_missing_split_fails_naming_task_split_and_path(name, split, path):
    with pytest.raises(bt.MissingSplitError) as info:
        bt.load_benchmark_task(name, local_dir=str(DATA))
    message = str(info.value)
    assert f"task {name!r}" in message and f"split {split!r}" in message and str(DATA / path) in message


@needs_data
def test_missing_split_names_the_explicit_override_and_what_is_there():
    with pytest.raises(bt.MissingSplitError) as info:
        bt.load_benchmark_task("mnli", local_dir=str(DATA))
    assert "data.split_overrides=[mnli.validation=SPLIT] (present there: train, validation_matched)" in str(info.value)


@needs_data
def test_a_source_reads_no_test_split():
    # qqp's test is the official validation, absent here: as a source it is not needed
    data = bt.load_benchmark_task("qqp", local_dir=str(DATA), with_test=False, max_train_samples=10)
    assert data.test == [] and data.split_sizes == {"train": 10, "validation": 1000, "test": 0, "train_rows": 9999}
    # the validation carve is the same whether the test split is read or not
    rte, rte_source = (bt.load_benchmark_task("rte", local_dir=str(DATA), with_test=w) for w in (True, False))
    assert rte_source.validation == rte.validation and rte_source.test == [] and len(rte.test) == 139


@needs_data
def test_split_override_reads_the_named_split_and_is_recorded():
    data = bt.load_benchmark_task("mnli", local_dir=str(DATA), with_test=False, max_train_samples=4,
                                  split_overrides={"validation": "validation_matched"})
    rows = read_rows("glue/mnli/validation_matched.jsonl")
    assert data.validation == bt.format_rows("mnli", rows) and data.test == []
    assert data.split_overrides == {"validation": "validation_matched"}
    assert data.split_sizes["validation_matched_rows"] == 9815
    # as a target, validation and test would be the same rows: refused
    with pytest.raises(bt.ProtocolError, match="model selection would see the test set"):
        bt.load_benchmark_task("mnli", local_dir=str(DATA), split_overrides={"validation": "validation_matched"})


def test_split_override_of_a_split_the_rule_does_not_read_is_refused():
    # RTE's validation and test both come from the halved official validation
    with pytest.raises(bt.ProtocolError, match="'test' cannot be overridden.*train, validation"):
        bt.load_benchmark_task("rte", local_dir="/nonexistent", split_overrides={"test": "validation"})
    with pytest.raises(bt.ProtocolError, match="'validation' cannot be overridden.*train, test"):
        bt.load_benchmark_task("qqp", local_dir="/nonexistent", split_overrides={"validation": "train"})


@needs_data
def test_hub_loading_asks_the_hub_for_the_protocols_splits(monkeypatch):
    """Without local_dir every split comes from ``datasets.load_dataset(hub name, config,
    split=...)``. No network here: a stand-in for the hub serves the same rows from shared/data
    and records what was asked."""
    import datasets

    asked = []

    def hub(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        folder = {"nyu-mll/glue": "glue", "aps/super_glue": "super_glue"}[path]
        return datasets.Dataset.from_list(read_rows(f"{folder}/{name}/{split}.jsonl"))

    local = bt.load_benchmark_task("rte", local_dir=str(DATA))
    monkeypatch.setattr(datasets, "load_dataset", hub)  # what read_official_split imports
    rte = bt.load_benchmark_task("rte", local_dir=None)
    assert (rte.train, rte.validation, rte.test) == (local.train, local.validation, local.test)
    bt.load_benchmark_task("qnli", local_dir=None, max_train_samples=5)
    bt.load_benchmark_task("cb", local_dir=None, with_test=False)
    assert asked == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation"),
                     ("nyu-mll/glue", "qnli", "train"), ("nyu-mll/glue", "qnli", "validation"),
                     ("aps/super_glue", "cb", "train"), ("aps/super_glue", "cb", "validation")]
    asked.clear()
    with pytest.raises(FileNotFoundError):  # the stand-in has no mnli mismatched file: the hub's name is asked
        bt.load_benchmark_task("mnli", local_dir=None)
    assert asked == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_mismatched")]


@needs_data
def test_sharded_split_loads_every_shard():
    data = bt.load_benchmark_task("multirc", local_dir=str(DATA), max_train_samples=5)
    assert data.split_sizes["train_rows"] == 27243 and data.split_sizes["validation_rows"] == 4848
    assert len(data.validation) == 2424 and all(e.group is not None for e in data.validation + data.test)


# ------------------------------------------------------------------ few-shot


@needs_data
@needs_data
def test_rotten_tomatoes_reads_its_own_three_splits_with_sst2s_template():
    data = bt.load_benchmark_task("rotten_tomatoes", local_dir=str(DATA), decoder_only=True)
    assert (len(data.train), len(data.validation), len(data.test)) == (8530, 1066, 1066)
    first = first_row("other/rotten_tomatoes/train.jsonl")
    assert data.train[0].source == f"rotten_tomatoes sentence: {first['text']} Label : "
    assert data.train[0].target == str(first["label"]) and data.labels == ("0", "1")
    assert {e.target for e in data.test} == {"0", "1"}


def test_k_shot_is_class_balanced_and_deterministic():
    data = bt.load_benchmark_task("cb", local_dir=str(DATA), k_shot=4, seed=3)
    assert sorted(e.target for e in data.train) == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    assert data.split_sizes["train"] == 12
    again = bt.load_benchmark_task("cb", local_dir=str(DATA), k_shot=4, seed=3)
    other = bt.load_benchmark_task("cb", local_dir=str(DATA), k_shot=4, seed=4)
    full = bt.load_benchmark_task("cb", local_dir=str(DATA))
    assert again.train == data.train and other.train != data.train
    assert data.validation == full.validation and data.test == full.test
    assert set(data.train) <= set(full.train)


@needs_data
def test_k_shot_binarises_stsb_at_2_5():
    data = bt.load_benchmark_task("stsb", local_dir=str(DATA), k_shot=8, seed=0)
    scores = [float(e.target) for e in data.train]
    assert len(scores) == 16 and sum(s <= 2.5 for s in scores) == 8


def test_local_subset_of_a_generative_task(tmp_path):
    folder = tmp_path / "super_glue" / "record"
    folder.mkdir(parents=True)
    other = {**RECORD, "answers": ["Dogs"], "query": "@placeholder do not"}
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in (RECORD, other, RECORD)) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps(RECORD) + "\n")
    data = bt.load_benchmark_task("record", local_dir=str(tmp_path))
    # a 3-row train is all carved into validation (1000 wanted): the sizes say what there was
    assert data.split_sizes == {"train": 0, "validation": 5, "test": 2, "train_rows": 3, "validation_rows": 1}
    assert data.labels is None and data.reported_metric == "f1"
    with pytest.raises(ValueError, match="generative"):
        bt.load_benchmark_task("record", local_dir=str(tmp_path), k_shot=4)


# ------------------------------------------------------------------ scoring


def test_score_reports_every_metric_and_their_mean():
    examples = [Example("x", t) for t in ("0", "1", "2", "1")]
    result = bt.score("cb", ["0", "1", "1", " 1 "], examples)
    assert set(result) == {"accuracy", "f1_multiclass", "mean"}
    assert result["accuracy"] == 0.75
    assert result["mean"] == pytest.approx((result["accuracy"] + result["f1_multiclass"]) / 2)
    stsb = bt.score("stsb", ["1.0", "2.0", "oops"], [Example("x", t) for t in ("1.0", "2.0", "3.0")])
    assert set(stsb) == {"pearson", "spearmanr", "mean"}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        bt.score("rte", ["0", "1"], [Example("x", "0")])


def test_score_multirc_groups_by_question_and_qa_takes_max_over_answers():
    examples = [bt.BenchmarkExample("q", t, (), g) for t, g in (("1", "a"), ("0", "a"), ("1", "b"), ("1", "c"))]
    result = bt.score("multirc", ["1", "0", "0", "1"], examples)
    assert result["em"] == pytest.approx(2 / 3)  # questions a and c fully right, b wrong
    assert result["f1"] == pytest.approx(0.8)  # tp 2, fn 1, fp 0
    with pytest.raises(ValueError, match="grouped by question"):
        bt.score("multirc", ["1"], [Example("q", "1")])
    qa = [bt.BenchmarkExample("q", "cat", ("cat", "the Cats")), bt.BenchmarkExample("q", "dog", ("dog",))]
    squad = bt.score("record", ["Cats!", "a dog"], qa)
    assert squad == {"f1": 1.0, "em": 1.0, "mean": 1.0}


def test_capped_evaluation_draws_at_random_not_the_first_rows():
    """Rotten Tomatoes' test split is sorted by label: its first 200 rows are all positive, which
    made every score on it the fraction of "positive" answers. A cap draws at random, the same
    examples for every run seed, in the split's order."""
    from dtvg_scale.recipes.config import DataArgs
    from dtvg_scale.data.tasks import load_task

    full = bt.load_benchmark_task("rotten_tomatoes", local_dir=str(DATA)).test
    assert {e.target for e in full[:200]} == {"1"}
    capped = [load_task("rotten_tomatoes", DataArgs(local_dir=str(DATA), max_eval_samples=200, seed=seed)).test
              for seed in (0, 1)]
    assert capped[0] == capped[1] and len(capped[0]) == 200
    positive = sum(e.target == "1" for e in capped[0])
    assert 70 < positive < 130
    positions = [full.index(e) for e in capped[0]]
    assert positions == sorted(positions)
