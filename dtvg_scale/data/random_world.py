"""The random world (``model.name_or_path=embedded:t5|llama``, tasks ``emb_*``): a tiny multi-task
benchmark that needs nothing downloaded, on a randomly initialised backbone. (The job's default
runs on the controlled world, ``dtvg_scale.data.controlled``.)

Why it exists
-------------
DTVG needs a target task, several source tasks and a frozen backbone. On an offline CPU
machine there is no GLUE and no pretrained T5/LLaMA, so this module supplies all three:
a suite of binary text-to-text tasks with *planted* relatedness to one target task, a
word-level tokenizer for both model families, and tiny randomly initialised backbones.
Because the relations are planted, a grouping method can be checked against the truth.

The world
---------
* Vocabulary: 64 content words ``w00`` .. ``w63``. Three are *key words*: ``w00`` (the
  target's feature), ``w01`` and ``w02`` (features of the unrelated tasks). The other 61
  are fillers.
* Every input is ``"<task name> <6-12 content words>"`` (the task's name is the prefix word,
  as in "rte sentence1: ..."); every target is ``"0"`` or ``"1"``.
* Rules (one key word each: a prototype found two-word rules made prompt tuning stall
  on detecting only one of the words):

  ===============  ===========  ===========================  ==========================
  task             relation     label "1" iff                 surface (length, fillers)
  ===============  ===========  ===========================  ==========================
  emb_target       target       w00 present                   full: 6-12, w03..w63
  emb_help_a       helpful      w00 present  (same rule)      short: 6-9, w03..w42
  emb_help_b       helpful      w00 present  (same rule)      long: 9-12, w24..w63
  emb_unrel_a      unrelated    w01 present                   short
  emb_unrel_b      unrelated    w02 absent                    long
  emb_conf_a       conflicting  w00 absent   (negated rule)   short
  emb_conf_b       conflicting  w00 absent   (negated rule)   long
  ===============  ===========  ===========================  ==========================

* Inputs, balance, nesting and determinism: as every synthetic world's
  (:mod:`dtvg_scale.data.synthetic`): each key word present with probability 1/2 in every task, so
  the key words do not reveal the relation; each relation type has exactly one "short" and one
  "long" source, so the length and filler distribution of a source says nothing about its
  relation either (a prototype found task vectors carried the input distribution more than the
  rule); label pairs; test -> validation -> train from separate crc32-seeded streams, so
  ``n_train=8`` gives the first 8 examples of ``n_train=512``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import transformers

from dtvg_scale.data import synthetic
from dtvg_scale.data.examples import TaskData
from dtvg_scale.data.synthetic import PlantedTask, Surface, World, check_family, make_tiny_model, padded_vocab_size
from dtvg_scale.runtime.cache import build_once
from dtvg_scale.runtime.progress import library_bars_hidden

__all__ = [
    "EMBEDDED_LABELS",
    "EMBEDDED_SOURCES",
    "EMBEDDED_TARGET",
    "EMBEDDED_TASKS",
    "EMBEDDED_WORDS",
    "WORLD",
    "build_tiny_backbone",
    "build_tokenizer",
    "embedded_corpus_text",
    "embedded_task",
    "task_rule",
]

EMBEDDED_LABELS: tuple[str, ...] = ("0", "1")
EMBEDDED_WORDS: tuple[str, ...] = tuple(f"w{i:02d}" for i in range(64))

WORLD = World(
    name="embedded",
    labels=EMBEDDED_LABELS,
    words=EMBEDDED_WORDS,
    keys=EMBEDDED_WORDS[:3],  # w00 the target's, w01 / w02 the unrelated tasks'
    surfaces={
        "full": Surface(6, 12, EMBEDDED_WORDS[3:]),
        "short": Surface(6, 9, EMBEDDED_WORDS[3:43]),
        "long": Surface(9, 12, EMBEDDED_WORDS[24:]),
    },
    tasks={
        "emb_target": PlantedTask("target", "w00", True, "full"),
        "emb_help_a": PlantedTask("helpful", "w00", True, "short"),
        "emb_help_b": PlantedTask("helpful", "w00", True, "long"),
        "emb_unrel_a": PlantedTask("unrelated", "w01", True, "short"),
        "emb_unrel_b": PlantedTask("unrelated", "w02", False, "long"),
        "emb_conf_a": PlantedTask("conflicting", "w00", False, "short"),
        "emb_conf_b": PlantedTask("conflicting", "w00", False, "long"),
    },
    stream_key=lambda parts: "dtvg-embedded/" + "/".join(map(str, parts)),  # (seed, task, split)
)
EMBEDDED_TASKS: tuple[str, ...] = WORLD.task_names
EMBEDDED_TARGET: str = EMBEDDED_TASKS[0]
EMBEDDED_SOURCES: tuple[str, ...] = EMBEDDED_TASKS[1:]


def task_rule(name: str) -> Callable[[Sequence[str] | str], str]:
    """The labelling rule of task ``name``: words (list or whitespace string) -> "0"/"1".

    Exposed so tests and analyses can check the planted relations on any input.
    """
    return WORLD.task(name).label


def embedded_task(
    name: str, seed: int = 0, n_train: int = 512, n_validation: int = 128, n_test: int = 128
) -> TaskData:
    """The splits of one embedded task, deterministic given (name, seed, sizes).

    Test is drawn first and train last, so the test and validation sets do not depend on
    ``n_train`` and a smaller train set is a prefix of a larger one (few-shot subsets nest).
    """
    return WORLD.splits(name, seed, n_train, n_validation, n_test)


def embedded_corpus_text(seed: int = 0) -> list[str]:
    """Every source and target string of every task (default sizes), e.g. for a tokenizer."""
    texts: list[str] = []
    for name in EMBEDDED_TASKS:
        splits = embedded_task(name, seed=seed)
        for example in (*splits.train, *splits.validation, *splits.test):
            texts.extend((example.source, example.target))
    return texts


def build_tokenizer(
    out_dir: str | os.PathLike, family: str, corpus: Sequence[str] | None = None, vocab_size: int = 2000
) -> transformers.PreTrainedTokenizerBase:
    """A tokenizer folder for ``family``, reloaded: word level over the embedded world without
    ``corpus``; with ``corpus`` (real text on a tiny backbone) a byte-level BPE of ``vocab_size``."""
    words = WORLD.tokens() if corpus is None else None
    return synthetic.build_tokenizer(out_dir, family, words=words, corpus=corpus, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------
# Tiny backbones
# ---------------------------------------------------------------------------------------

_STAMP = "dtvg_embedded_build.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", _STAMP)


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, stamp: dict) -> bool:
    return _read_stamp(folder) == stamp and all((folder / f).is_file() for f in _REQUIRED_FILES)


def build_tiny_backbone(
    out_dir: str | os.PathLike,
    family: str,
    tokenizer: transformers.PreTrainedTokenizerBase,
    seed: int = 0,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
) -> str:
    """Build (or reuse) a tiny randomly initialised T5 / LLaMA with its tokenizer in ``out_dir``.

    No pretrained weights exist offline, so the "frozen backbone" is built from a config.
    A JSON stamp of the arguments (and the tokenizer's vocabulary) makes a repeated call
    return at once. The folder is built in a temporary sibling and renamed into place, so
    processes racing to build it (e.g. two ranks) never see a half-written folder; the
    loser of the race discards its copy. The caller's torch RNG state is left untouched.
    """
    import torch

    family = check_family(family)
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    vocab_size = padded_vocab_size(tokenizer)
    vocab_items = sorted(tokenizer.get_vocab().items())
    stamp = {
        "format": 1,
        "family": family,
        "seed": seed,
        "d_model": d_model,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "d_ff": d_ff,
        "vocab_size": vocab_size,
        "vocab_crc32": zlib.crc32(json.dumps(vocab_items).encode()),
        "special_ids": [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id],
    }
    out = Path(out_dir)
    if _is_complete(out, stamp):
        return str(out)
    if out.exists() and any(out.iterdir()) and _read_stamp(out) is None:
        # Never replace a folder this function did not write (e.g. a mistyped path).
        raise FileExistsError(f"{out} exists, is not empty and is not an embedded backbone build")

    def build(folder: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_tiny_model(family, tokenizer, vocab_size, d_model, num_layers, num_heads, d_ff)
        with library_bars_hidden():
            model.save_pretrained(folder)  # safetensors by default
        tokenizer.save_pretrained(folder)
        (folder / _STAMP).write_text(json.dumps(stamp, sort_keys=True))  # last: marks completeness

    return str(build_once(out, lambda folder: _is_complete(folder, stamp), build))

