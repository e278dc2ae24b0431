"""What the two synthetic worlds share: tasks with planted relations, their tokenizers, tiny backbones.

Two worlds stand in for GLUE and a pretrained model on an offline machine: ``random_world`` (the
random-backbone world of the tests, ``embedded:*``) and ``controlled`` (a backbone pretrained here
on a family of rules). Each declares its words, input surfaces and tasks as a :class:`World`; this module draws
their examples, builds word-level tokenizers for both model families and makes the tiny
untrained T5 / LLaMA backbones.

A world's task is one rule: label "1" iff its *key* word is present (or absent). In every input
each key word of the world is present (once, at a random position) with probability 1/2,
independently, except the rule's own key, which the label fixes; so inputs never give a task's
relation to the target away. Examples come in label pairs (one "0", one "1", in random order),
so every split and every prefix of one is balanced to within one example; splits are drawn test
-> validation -> train from separate streams and are disjoint, so a smaller train split is a
prefix of a larger one and test does not change with ``n_train``. Every stream is
``random.Random(zlib.crc32(...))``, never Python's salted ``hash()``, so all processes (every
rank) draw the same examples.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import transformers

from dtvg_scale.data.examples import Example, TaskData, UnknownTaskError

FAMILIES: tuple[str, ...] = ("t5", "llama")


@dataclass(frozen=True)
class Surface:
    """How a task's inputs look: how many content words, drawn from which fillers."""

    min_len: int
    max_len: int
    fillers: tuple[str, ...]


@dataclass(frozen=True)
class PlantedTask:
    relation: str  # to the world's target: "target", "helpful", "unrelated", "conflicting"
    key: str  # the one word the rule looks at
    present: bool  # label "1" iff the key is present (True) or absent (False)
    surface: str  # a key of the world's surfaces

    def label(self, words: Sequence[str] | str) -> str:
        """The rule on any input (a word list or a whitespace string); the prefix word never
        matters, since task names are never key words."""
        if isinstance(words, str):
            words = words.split()
        return "1" if (self.key in words) == self.present else "0"


@dataclass(frozen=True)
class World:
    """One synthetic world: its vocabulary, surfaces and tasks, and how its streams are named."""

    name: str  # "embedded", "controlled": in error messages
    labels: tuple[str, ...]
    words: tuple[str, ...]  # every content word, key words included
    keys: tuple[str, ...]  # the key words, each present with p = 1/2 in every input
    surfaces: Mapping[str, Surface]
    tasks: Mapping[str, PlantedTask]  # the first is the target
    stream_key: Callable[[tuple], str]  # (seed, task, split) -> the text whose crc32 seeds the stream
    target_train: int | None = None  # the target's train split is capped at this (few-shot)
    extra_tokens: tuple[str, ...] = ()  # words of the world's other texts (the controlled rule tokens)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def task(self, name: str) -> PlantedTask:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(f"unknown {self.name} task {name!r}; known {self.name} tasks: "
                                   f"{', '.join(self.tasks)}") from None

    def stream(self, *parts) -> random.Random:
        """A random stream that is the same in every process (crc32, not the salted hash())."""
        return random.Random(zlib.crc32(self.stream_key(parts).encode()))

    def sample_words(self, rng: random.Random, surface: Surface, key: str, key_present: bool) -> list[str]:
        """One input's content words: every key word present with p = 1/2 except ``key``, which is fixed."""
        length = rng.randint(surface.min_len, surface.max_len)
        present = []
        for word in self.keys:
            coin = rng.random() < 0.5  # always drawn, so the stream does not depend on `key`
            if key_present if word == key else coin:
                present.append(word)
        words = [rng.choice(surface.fillers) for _ in range(max(length - len(present), 1))]
        for word in present:
            words.insert(rng.randint(0, len(words)), word)
        return words

    def generate(self, name: str, rng: random.Random, n: int, seen: set[str]) -> list[Example]:
        """``n`` examples of task ``name`` in label pairs (random order within a pair), none in ``seen``."""
        spec = self.task(name)
        surface = self.surfaces[spec.surface]
        out: list[Example] = []
        pair: list[str] = []
        while len(out) < n:
            if not pair:
                pair = list(self.labels)
                rng.shuffle(pair)
            label = pair.pop()
            key_present = (label == "1") == spec.present
            for _ in range(10_000):
                source = " ".join([name, *self.sample_words(rng, surface, spec.key, key_present)])
                if source not in seen:
                    break
            else:  # pragma: no cover - the input space is astronomically larger than any split
                raise RuntimeError(f"could not draw {n} distinct inputs for {name}")
            seen.add(source)
            out.append(Example(source, label))
        return out

    def splits(self, name: str, seed: int = 0, n_train: int = 512, n_validation: int = 128,
               n_test: int = 128) -> TaskData:
        """The splits of one task, deterministic given (name, seed, sizes): test first, train last."""
        spec = self.task(name)
        if min(n_train, n_validation, n_test) < 0:
            raise ValueError("split sizes must be non-negative")
        if spec.relation == "target" and self.target_train is not None:
            n_train = min(n_train, self.target_train)
        seen: set[str] = set()
        test = self.generate(name, self.stream(seed, name, "test"), n_test, seen)
        validation = self.generate(name, self.stream(seed, name, "validation"), n_validation, seen)
        train = self.generate(name, self.stream(seed, name, "train"), n_train, seen)
        return TaskData(name=name, train=train, validation=validation, test=test, labels=self.labels,
                        relation=spec.relation)

    def tokens(self) -> list[str]:
        """Every word of the world in a fixed order (not read from data, so it never misses one)."""
        return [*self.labels, *self.tasks, *self.extra_tokens, *self.words]


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------

# Special tokens, post-processing template and tokenizer arguments per family; data.encode_examples
# relies on them (T5 appends eos; LLaMA prepends bos and the pipeline appends eos to targets).
_FAMILY_LAYOUT = {
    # T5: pad 0 (also the decoder start), eos 1 appended, unk 2
    "t5": (["<pad>", "</s>", "<unk>"], ("$A </s>", "$A </s> $B </s>", [("</s>", 1)]),
           {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
    # LLaMA: unk 0, bos 1 prepended, eos 2, plus a pad token
    "llama": (["<unk>", "<s>", "</s>", "<pad>"], ("<s> $A", "<s> $A <s> $B", [("<s>", 1)]),
              {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}),
}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return family


def build_tokenizer(out_dir: str | os.PathLike, family: str, words: Sequence[str] | None = None,
                    corpus: Sequence[str] | None = None,
                    vocab_size: int = 2000) -> transformers.PreTrainedTokenizerBase:
    """Write a tokenizer folder for ``family`` and return it reloaded from disk.

    With ``words``: word level, every word (and each label) exactly one token. With ``corpus``
    (real text, e.g. GLUE tasks on a tiny backbone): a byte-level BPE of ``vocab_size`` trained on
    it, which round-trips any string exactly (labels such as "2.4" decode back unchanged). Either
    is saved through ``PreTrainedTokenizerFast`` (tokenizer.json) because in transformers 5
    ``T5Tokenizer(vocab_file=...)`` silently builds a broken tokenizer; returning the *reloaded*
    tokenizer guarantees callers use exactly what ``from_pretrained`` gives.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if (words is None) == (corpus is None):
        raise ValueError("build_tokenizer takes either words (word level) or corpus (byte-level BPE)")
    specials, (single, pair, template_specials), special_kwargs = _FAMILY_LAYOUT[check_family(family)]
    if words is not None:
        vocab = {token: i for i, token in enumerate([*specials, *words])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:  # specials first, so they keep the ids above
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=template_specials)
    backend.add_special_tokens(specials)  # never split, skipped by skip_special_tokens
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                                model_max_length=512, **special_kwargs)
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

def padded_vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 8) * 8  # round up to a multiple of 8


def make_tiny_model(family: str, tokenizer, vocab_size: int, d_model: int, num_layers: int, num_heads: int, d_ff: int):
    """An untrained tiny T5 or LLaMA sized by the arguments, its special ids the tokenizer's
    (the embedded world keeps it random; the controlled world pretrains it)."""
    if check_family(family) == "t5":
        config = transformers.T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff, num_layers=num_layers,
            num_decoder_layers=num_layers, num_heads=num_heads, dropout_rate=0.0, feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=512,
        attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config)
