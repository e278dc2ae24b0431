"""An embedded default world: a tiny multi-task benchmark that needs nothing downloaded.

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

* Same inputs for everyone: in *every* task each key word is present (once, at a random
  position) with probability 1/2, independently of the others, so the unrelated tasks'
  labels are independent of the target's and the key words do not reveal the relation.
  Each relation type gets exactly one "short" and one "long" source, so the length and
  filler distribution of a source says nothing about its relation to the target either
  (a prototype found task vectors carried the input distribution more than the rule).
* Balance and nesting: examples are generated in pairs (one "0", one "1", in random
  order), so every split and every prefix of a split is balanced to within one example,
  and ``n_train=8`` gives the first 8 examples of ``n_train=512``. Splits are generated
  test -> validation -> train from separate random streams and are disjoint (no source
  string occurs twice in a task), so the test set does not change with ``n_train``.
* Determinism: every stream is ``random.Random(zlib.crc32(...))`` of (seed, task, split),
  never Python's salted ``hash()``, so all processes (e.g. all ranks) agree.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import transformers

from dtvg_scale.progress import library_bars_hidden

__all__ = [
    "EMBEDDED_LABELS",
    "EMBEDDED_SOURCES",
    "EMBEDDED_TARGET",
    "EMBEDDED_TASKS",
    "EMBEDDED_WORDS",
    "Example",
    "TaskSplits",
    "UnknownEmbeddedTaskError",
    "build_tiny_backbone",
    "build_tokenizer",
    "embedded_corpus_text",
    "embedded_task",
    "task_rule",
]


@dataclass(frozen=True)
class Example:
    """One text-to-text example."""

    source: str
    target: str


@dataclass(frozen=True)
class TaskSplits:
    """The three splits of one task plus what is known about it."""

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    relation: str  # "target", "helpful", "unrelated" or "conflicting"
    labels: tuple[str, ...]


class UnknownEmbeddedTaskError(ValueError, KeyError):
    """An unknown task name: a ValueError for callers, a KeyError for dict-like lookups."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------
# The world's definition
# ---------------------------------------------------------------------------------------

EMBEDDED_LABELS: tuple[str, ...] = ("0", "1")
EMBEDDED_WORDS: tuple[str, ...] = tuple(f"w{i:02d}" for i in range(64))
_KEY_WORDS: tuple[str, ...] = EMBEDDED_WORDS[:3]  # w00 target's, w01 / w02 unrelated ones


@dataclass(frozen=True)
class _Surface:
    """How a task's inputs look: content length range and filler words."""

    min_len: int
    max_len: int
    fillers: tuple[str, ...]


_SURFACES: dict[str, _Surface] = {
    "full": _Surface(6, 12, EMBEDDED_WORDS[3:]),
    "short": _Surface(6, 9, EMBEDDED_WORDS[3:43]),
    "long": _Surface(9, 12, EMBEDDED_WORDS[24:]),
}


@dataclass(frozen=True)
class _TaskDef:
    relation: str
    key: str  # the one word the rule looks at
    present: bool  # label "1" iff the key is present (True) or absent (False)
    surface: str


_TASK_DEFS: dict[str, _TaskDef] = {
    "emb_target": _TaskDef("target", "w00", True, "full"),
    "emb_help_a": _TaskDef("helpful", "w00", True, "short"),
    "emb_help_b": _TaskDef("helpful", "w00", True, "long"),
    "emb_unrel_a": _TaskDef("unrelated", "w01", True, "short"),
    "emb_unrel_b": _TaskDef("unrelated", "w02", False, "long"),
    "emb_conf_a": _TaskDef("conflicting", "w00", False, "short"),
    "emb_conf_b": _TaskDef("conflicting", "w00", False, "long"),
}

EMBEDDED_TASKS: tuple[str, ...] = tuple(_TASK_DEFS)
EMBEDDED_TARGET: str = EMBEDDED_TASKS[0]
EMBEDDED_SOURCES: tuple[str, ...] = EMBEDDED_TASKS[1:]


def _task_def(name: str) -> _TaskDef:
    try:
        return _TASK_DEFS[name]
    except KeyError:
        raise UnknownEmbeddedTaskError(
            f"unknown embedded task {name!r}; known embedded tasks: {', '.join(EMBEDDED_TASKS)}"
        ) from None


def task_rule(name: str) -> Callable[[Sequence[str] | str], str]:
    """The labelling rule of task ``name``: words (list or whitespace string) -> "0"/"1".

    Exposed so tests and analyses can check the planted relations on any input; the
    prefix word never matters because task names are never key words.
    """
    spec = _task_def(name)

    def rule(words: Sequence[str] | str) -> str:
        if isinstance(words, str):
            words = words.split()
        return "1" if (spec.key in words) == spec.present else "0"

    return rule


# ---------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------


def _rng(seed: int, name: str, split: str) -> random.Random:
    """A stream that is the same in every process (crc32, not the salted hash())."""
    return random.Random(zlib.crc32(f"dtvg-embedded/{seed}/{name}/{split}".encode()))


def _sample_words(rng: random.Random, surface: _Surface, key: str, key_present: bool) -> list[str]:
    """Draw one input: every key word present with p=1/2 except ``key``, which is fixed."""
    length = rng.randint(surface.min_len, surface.max_len)
    present = []
    for word in _KEY_WORDS:
        coin = rng.random() < 0.5  # always drawn, so the stream does not depend on `key`
        if (key_present if word == key else coin):
            present.append(word)
    words = [rng.choice(surface.fillers) for _ in range(length - len(present))]
    for word in present:
        words.insert(rng.randint(0, len(words)), word)
    return words


def _generate(name: str, spec: _TaskDef, rng: random.Random, n: int, seen: set[str]) -> list[Example]:
    """``n`` examples in label pairs (random order within a pair), none already in ``seen``."""
    surface = _SURFACES[spec.surface]
    out: list[Example] = []
    labels: list[str] = []
    while len(out) < n:
        if not labels:
            labels = list(EMBEDDED_LABELS)
            rng.shuffle(labels)
        label = labels.pop()
        key_present = (label == "1") == spec.present
        for _ in range(10_000):
            source = " ".join([name, *_sample_words(rng, surface, spec.key, key_present)])
            if source not in seen:
                break
        else:  # pragma: no cover - the input space is astronomically larger than any split
            raise RuntimeError(f"could not draw {n} distinct inputs for {name}")
        seen.add(source)
        out.append(Example(source, label))
    return out


def embedded_task(
    name: str, seed: int = 0, n_train: int = 512, n_validation: int = 128, n_test: int = 128
) -> TaskSplits:
    """The splits of one embedded task, deterministic given (name, seed, sizes).

    Test is drawn first and train last, so the test and validation sets do not depend on
    ``n_train`` and a smaller train set is a prefix of a larger one (few-shot subsets nest).
    """
    spec = _task_def(name)
    if min(n_train, n_validation, n_test) < 0:
        raise ValueError("split sizes must be non-negative")
    seen: set[str] = set()
    test = _generate(name, spec, _rng(seed, name, "test"), n_test, seen)
    validation = _generate(name, spec, _rng(seed, name, "validation"), n_validation, seen)
    train = _generate(name, spec, _rng(seed, name, "train"), n_train, seen)
    return TaskSplits(name, train, validation, test, spec.relation, EMBEDDED_LABELS)


def embedded_corpus_text(seed: int = 0) -> list[str]:
    """Every source and target string of every task (default sizes), e.g. for a tokenizer."""
    texts: list[str] = []
    for name in EMBEDDED_TASKS:
        splits = embedded_task(name, seed=seed)
        for example in (*splits.train, *splits.validation, *splits.test):
            texts.extend((example.source, example.target))
    return texts


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

_FAMILIES = ("t5", "llama")


def _check_family(family: str) -> str:
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {_FAMILIES}")
    return family


def _world_tokens() -> list[str]:
    """Every word of the world, in a fixed order (not read from data, so it never misses one)."""
    return [*EMBEDDED_LABELS, *EMBEDDED_TASKS, *EMBEDDED_WORDS]


def build_tokenizer(
    out_dir: str | os.PathLike, family: str, corpus: Sequence[str] | None = None, vocab_size: int = 2000
) -> transformers.PreTrainedTokenizerBase:
    """Write a tokenizer folder for ``family`` and return it reloaded from disk.

    Without ``corpus``: word level over the embedded world, so every word (and each label) is
    exactly one token. With ``corpus`` (real text, e.g. GLUE tasks on a tiny backbone): a
    byte-level BPE of ``vocab_size`` trained on it, which round-trips any string exactly
    (labels such as "2.4" decode back unchanged). Either is saved through
    ``PreTrainedTokenizerFast`` (tokenizer.json) because in transformers 5
    ``T5Tokenizer(vocab_file=...)`` silently builds a broken tokenizer. Returning the
    *reloaded* tokenizer guarantees callers use exactly what ``from_pretrained`` gives.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    family = _check_family(family)
    if family == "t5":  # T5: pad 0 (also the decoder start), eos 1 appended, unk 2
        specials = ["<pad>", "</s>", "<unk>"]
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
        )
        special_kwargs = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:  # LLaMA: unk 0, bos 1 prepended, eos 2, plus a pad token
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        template = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        special_kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

    if corpus is None:
        vocab = {token: i for i, token in enumerate([*specials, *_world_tokens()])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:  # specials first, so they keep the ids above
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(corpus, trainer)
    backend.post_processor = template
    backend.add_special_tokens(specials)  # never split, skipped by skip_special_tokens
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, model_max_length=512, **special_kwargs
    )

    # Write next to the folder, then move file by file: racing writers produce identical
    # files, and a reader never sees a half-written one.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-tmp-", dir=out))
    try:
        fast.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return transformers.AutoTokenizer.from_pretrained(out)


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


def make_tiny_model(family: str, tokenizer, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int):
    """An untrained tiny T5 or LLaMA sized by the arguments, its special ids the tokenizer's
    (the embedded world builds it random; the controlled world pretrains it)."""
    if family == "t5":
        config = transformers.T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // num_heads,
            d_ff=d_ff,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=num_heads,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


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

    family = _check_family(family)
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    vocab_size = -(-len(tokenizer) // 8) * 8  # round up to a multiple of 8
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_tiny_model(family, tokenizer, vocab_size, d_model, num_layers, num_heads, d_ff)
        with library_bars_hidden():
            model.save_pretrained(tmp)  # safetensors by default
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, sort_keys=True))  # last: marks completeness
        _install(tmp, out, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _install(tmp: Path, out: Path, stamp: dict) -> None:
    """Atomically put ``tmp`` at ``out``, replacing an older build with other settings."""
    for _ in range(5):
        try:
            os.replace(tmp, out)  # succeeds if out is missing or an empty directory
            return
        except OSError:
            if _is_complete(out, stamp):  # another process finished the same build first
                return
            aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
            try:
                os.replace(out, aside)  # an older build with other settings: move it aside
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not install the backbone build at {out}")
