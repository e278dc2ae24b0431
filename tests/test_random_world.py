"""The random world (data/random_world.py, `embedded:*`): data, planted relations, tokenizers, tiny backbones."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import transformers

from dtvg_scale.data.examples import Example
from dtvg_scale.data.examples import TaskData
from dtvg_scale.data.random_world import (
    EMBEDDED_LABELS,
    EMBEDDED_SOURCES,
    EMBEDDED_TARGET,
    EMBEDDED_TASKS,
    build_tiny_backbone,
    build_tokenizer,
    embedded_corpus_text,
    embedded_task,
    task_rule,
)

SMALL = {"n_train": 200, "n_validation": 60, "n_test": 60}


def _words(example: Example) -> list[str]:
    return example.source.split()[1:]


def _all_examples(splits: TaskData) -> list[Example]:
    return [*splits.train, *splits.validation, *splits.test]


# --------------------------------------------------------------------------- suite layout


def test_suite_layout():
    assert EMBEDDED_TASKS[0] == EMBEDDED_TARGET
    assert EMBEDDED_SOURCES == EMBEDDED_TASKS[1:]
    relations = [embedded_task(n, n_train=2, n_validation=2, n_test=2).relation for n in EMBEDDED_TASKS]
    assert relations[0] == "target"
    for relation in ("helpful", "unrelated", "conflicting"):
        assert relations.count(relation) == 2


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError) as info:
        embedded_task("no_such_task")
    for name in EMBEDDED_TASKS:
        assert name in str(info.value)
    with pytest.raises(KeyError):
        task_rule("no_such_task")


# --------------------------------------------------------------------------- data


def test_deterministic_and_seed_dependent():
    a = embedded_task("emb_help_a", seed=3, **SMALL)
    b = embedded_task("emb_help_a", seed=3, **SMALL)
    c = embedded_task("emb_help_a", seed=4, **SMALL)
    assert a == b
    assert a.train != c.train and a.test != c.test


def test_sizes_disjoint_format_and_nesting():
    for name in EMBEDDED_TASKS:
        s = embedded_task(name, **SMALL)
        assert (len(s.train), len(s.validation), len(s.test)) == (200, 60, 60)
        assert s.labels == EMBEDDED_LABELS == ("0", "1")
        sources = [e.source for e in _all_examples(s)]
        assert len(set(sources)) == len(sources), "splits must be disjoint and duplicate-free"
        for e in _all_examples(s):
            prefix, *words = e.source.split()
            assert prefix == name and 6 <= len(words) <= 12 and e.target in s.labels
    # few-shot subsets nest, and test/validation do not depend on n_train
    big = embedded_task(EMBEDDED_TARGET, **SMALL)
    few = embedded_task(EMBEDDED_TARGET, n_train=8, n_validation=60, n_test=60)
    assert few.train == big.train[:8] and few.test == big.test and few.validation == big.validation


def test_labels_balanced():
    for name in EMBEDDED_TASKS:
        s = embedded_task(name, **SMALL)
        for split in (s.train, s.validation, s.test):
            ones = sum(e.target == "1" for e in split) / len(split)
            assert abs(ones - 0.5) <= 0.1
        assert abs(sum(e.target == "1" for e in s.train[:16]) - 8) <= 1  # prefixes too


def test_labels_follow_rules_and_relations_hold():
    target_rule = task_rule(EMBEDDED_TARGET)
    for name in EMBEDDED_TASKS:
        s = embedded_task(name, **SMALL)
        rule = task_rule(name)
        assert all(rule(_words(e)) == e.target for e in _all_examples(s))
        assert all(rule(e.source) == e.target for e in s.test)  # a whole string works too
    # the same inputs (drawn from every task) under each source's rule
    inputs = [_words(e) for n in EMBEDDED_TASKS for e in embedded_task(n, **SMALL).train]
    for name in EMBEDDED_SOURCES:
        relation = embedded_task(name, n_train=1, n_validation=1, n_test=1).relation
        rule = task_rule(name)
        agree = sum(rule(w) == target_rule(w) for w in inputs) / len(inputs)
        expected = {"helpful": (1.0, 1.0), "conflicting": (0.0, 0.0), "unrelated": (0.4, 0.6)}[relation]
        assert expected[0] <= agree <= expected[1], (name, agree)


def test_input_distribution_does_not_reveal_relation():
    """Every task shows each key word about half the time; lengths match across relation types."""
    mean_len: dict[str, list[float]] = {}
    for name in EMBEDDED_TASKS:
        s = embedded_task(name, n_train=400, n_validation=0, n_test=0)
        for key in ("w00", "w01", "w02"):
            rate = sum(key in _words(e) for e in s.train) / len(s.train)
            assert abs(rate - 0.5) <= 0.1, (name, key, rate)
        if name != EMBEDDED_TARGET:
            length = sum(len(_words(e)) for e in s.train) / len(s.train)
            mean_len.setdefault(s.relation, []).append(length)
    profiles = [sorted(v) for v in mean_len.values()]
    for profile in profiles[1:]:
        assert all(abs(a - b) < 0.5 for a, b in zip(profile, profiles[0]))


def test_corpus_text_covers_every_task():
    texts = embedded_corpus_text()
    assert len(texts) == len(EMBEDDED_TASKS) * (512 + 128 + 128) * 2
    assert {t.split()[0] for t in texts[::2]} == set(EMBEDDED_TASKS)
    assert set(texts[1::2]) == set(EMBEDDED_LABELS)


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, transformers.PreTrainedTokenizerBase]:
    root = tmp_path_factory.mktemp("tok")
    return {family: build_tokenizer(root / family, family) for family in ("t5", "llama")}


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_tokenizer_round_trip_and_conventions(tokenizers, family, tmp_path):
    tok = tokenizers[family]
    texts = embedded_corpus_text()
    for text in texts[::7]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    vocab = tok.get_vocab()
    assert all(word in vocab for text in texts for word in text.split())
    for label in EMBEDDED_LABELS:
        assert len(tok(label, add_special_tokens=False).input_ids) == 1
    ids = tok("emb_target w00 w01").input_ids
    if family == "t5":
        assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert ids[-1] == 1 and len(ids) == 4
    else:
        assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
        assert tok.pad_token is not None and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
        assert ids[0] == tok.bos_token_id and len(ids) == 4
    # a fresh, offline reload gives the same tokenizer
    reloaded = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    assert reloaded.get_vocab() == vocab and reloaded("emb_help_b w05 1").input_ids == tok("emb_help_b w05 1").input_ids
    # and building again into the same folder is harmless
    again = build_tokenizer(tok.name_or_path, family)
    assert again.get_vocab() == vocab


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_tiny_backbone_builds_reloads_and_is_reused(tokenizers, family, tmp_path: Path):
    tok = tokenizers[family]
    out = tmp_path / f"{family}-tiny"
    rng_before = torch.get_rng_state()
    assert build_tiny_backbone(out, family, tok, seed=1) == str(out)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs must be cleaned up"

    auto = transformers.AutoModelForSeq2SeqLM if family == "t5" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == model.config.vocab_size >= len(tok) and rows % 8 == 0
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    if family == "t5":
        assert model.config.decoder_start_token_id == tok.pad_token_id == 0
        assert model.config.dropout_rate == 0.0
    else:
        assert model.config.bos_token_id == tok.bos_token_id

    batch = transformers.AutoTokenizer.from_pretrained(out)(
        ["emb_target w00 w07 w09 w11 w13 w15", "emb_conf_a w01 w03 w05 w07 w09 w10"], return_tensors="pt", padding=True
    )
    labels = batch.input_ids.clone() if family == "llama" else tok(["1", "0"], return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item())

    # same settings: reused, files untouched
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_tiny_backbone(out, family, tok, seed=1) == str(out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # other settings: rebuilt in place, deterministically
    first = dict(model.state_dict())
    build_tiny_backbone(out, family, tok, seed=2)
    other = auto.from_pretrained(out).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first)
    build_tiny_backbone(tmp_path / "again", family, tok, seed=1)
    same = auto.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(first[k], same[k]) for k in first)


def test_backbone_refuses_foreign_folder(tokenizers, tmp_path: Path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_backbone(tmp_path, "t5", tokenizers["t5"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_family(tmp_path: Path):
    with pytest.raises(ValueError, match="llama"):
        build_tokenizer(tmp_path, "gpt9")
    assert not os.listdir(tmp_path)
