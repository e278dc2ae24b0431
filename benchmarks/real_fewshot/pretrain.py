"""A tiny T5 pretrained on the bundled GLUE/SuperGLUE train text: span corruption + prefix LM.

No pretrained weights can be downloaded here, and a random backbone leaves prompt tuning at
chance by construction. This gives the real-data benchmark a backbone that has at least seen
the tasks' text: a byte-level BPE tokenizer and a small T5 trained for a few minutes to fill in
masked spans of the *train* inputs of the target and source tasks (no labels, and never a row
of any validation or test split the benchmark scores, so nothing the prompts are selected or
scored on was seen in pretraining). It does not make the model understand English; it makes
the inputs familiar token sequences instead of noise.

Why two objectives: with span corruption alone every target starts with ``<extra_id_0>``, so the
decoder learns to open with it whatever the encoder says, and a soft prompt (which reaches the
decoder only through cross-attention) needed ~150 steps at lr 1.0 to make it say a label at all
(SST-2 validation accuracy 0.0 until then, in a first build). Lester et al. (2021) saw the same
with span-corruption T5 and fixed it with "LM adaptation"; here half of the examples are prefix
LM (the encoder reads the start of a text, the decoder continues it), so the first decoder token
depends on the input.

The folder is written with ``save_pretrained`` (model and tokenizer) so ``train.py`` loads it as
``model.name_or_path=<folder>``, and it is reused when ``pretrain.json`` holds the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from dtvg_scale.data import benchmark_tasks

CORPUS_TASKS = ("rte", "cb", "mrpc", "mnli", "qnli", "qqp", "sst2")
SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2 (pad is also the decoder start)


@dataclass
class PretrainConfig:
    d_model: int = 64  # small because one free CPU core runs the whole table (see run.py)
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    vocab_size: int = 8000  # BPE merges learnt on the corpus, sentinels come on top
    sentinels: int = 32  # <extra_id_0..31>: enough for 15 % noise in 128 tokens (about 6 spans)
    max_length: int = 128  # tokens kept per text (the benchmark truncates inputs the same way)
    noise_density: float = 0.15  # T5's span corruption
    mean_span: float = 3.0
    prefix_lm_fraction: float = 0.5  # the rest is span corruption (see the module docstring)
    prefix_lm_target: int = 32  # continuation tokens predicted (keeps the decoder cheap)
    steps: int = 500  # ~0.4 s a step on one core: about 4 minutes
    batch_size: int = 64
    lr: float = 3e-3
    max_texts_per_task: int = 10_000  # SST-2's 66k short sentences would otherwise be two thirds of the text
    warmup: int = 100
    heldout: int = 512  # texts kept out of training to measure the loss on
    seed: int = 0


# ------------------------------------------------------------------------------ corpus

def task_train_texts(task: str, data_dir: str) -> list[str]:
    """The task's training inputs as the benchmark formats them, without labels.

    Large tasks carve their validation out of the official train (the protocol's first 1000 of
    a seed-42 permutation); those rows are dropped so no validation text is pretrained on."""
    spec = benchmark_tasks.get_spec(task)
    rows = benchmark_tasks.read_official_split(task, spec.split_rule.train, data_dir).to_list()
    if spec.split_rule.kind == "carve_train":
        # the same permutation the loader uses, so exactly its validation rows are left out
        carved = set(benchmark_tasks.seeded_permutation(len(rows), 42)[: benchmark_tasks.VALIDATION_FROM_TRAIN])
        rows = [row for i, row in enumerate(rows) if i not in carved]
    return [example.source for example in benchmark_tasks.format_rows(task, rows, is_train=True)]


def corpus(data_dir: str, cap: int, seed: int, tasks: tuple[str, ...] = CORPUS_TASKS) -> dict[str, list[str]]:
    """Each task's train texts, at most ``cap`` of them (a seeded random subset)."""
    out = {}
    for task in tasks:
        texts = task_train_texts(task, data_dir)
        if len(texts) > cap:
            texts = [texts[i] for i in sorted(np.random.default_rng(seed).choice(len(texts), cap, replace=False))]
        out[task] = texts
    return out


# ------------------------------------------------------------------------------ tokenizer

def sentinel_tokens(n: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def build_tokenizer(texts: list[str], out: Path, cfg: PretrainConfig) -> transformers.PreTrainedTokenizerBase:
    """Byte-level BPE (round-trips any string, so labels like "0" decode back exactly) with T5's
    special ids; the sentinels are added last so they sit at the top of the vocabulary, away
    from the low ids P_init is drawn from."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    backend.add_special_tokens([*SPECIALS, *sentinel_tokens(cfg.sentinels)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, model_max_length=512,
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=sentinel_tokens(cfg.sentinels),
    )
    fast.save_pretrained(out)
    return transformers.AutoTokenizer.from_pretrained(out)  # exactly what train.py will load


# ------------------------------------------------------------------------------ span corruption

def _segments(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items cut into ``count`` non-empty runs at random (T5's random segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=count - 1, replace=False)) if count > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, cfg: PretrainConfig,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """T5 span corruption: about ``noise_density`` of the tokens, in spans of mean ``mean_span``,
    become one sentinel each in the input; the target lists each sentinel and its span."""
    n = len(ids)
    noise = min(max(1, round(n * cfg.noise_density)), n - 1)
    spans = min(max(1, round(noise / cfg.mean_span)), len(sentinels), noise, n - noise)
    noise_lengths, keep_lengths = _segments(noise, spans, rng), _segments(n - noise, spans, rng)
    source, target, pos = [], [], 0
    for i, (keep, drop) in enumerate(zip(keep_lengths, noise_lengths)):
        source += [*ids[pos:pos + keep], sentinels[i]]
        pos += keep
        target += [sentinels[i], *ids[pos:pos + drop]]
        pos += drop
    return source + [eos], target + [eos]


def prefix_lm(ids: list[int], eos: int, cfg: PretrainConfig, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """T5's LM adaptation: the encoder reads a prefix, the decoder continues the text."""
    cut = int(rng.integers(1, len(ids)))
    return ids[:cut] + [eos], ids[cut:cut + cfg.prefix_lm_target] + [eos]


def make_example(ids: list[int], sentinels: list[int], eos: int, cfg: PretrainConfig,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    if rng.random() < cfg.prefix_lm_fraction:
        return prefix_lm(ids, eos, cfg, rng)
    return span_corrupt(ids, sentinels, eos, cfg, rng)


def collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    def pad_rows(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    inputs = pad_rows([p[0] for p in pairs], pad)
    return {"input_ids": inputs, "attention_mask": (inputs != pad).long(), "labels": pad_rows([p[1] for p in pairs], -100)}


# ------------------------------------------------------------------------------ training

def make_model(tok, cfg: PretrainConfig) -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(
        vocab_size=-(-len(tok) // 8) * 8, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return transformers.T5ForConditionalGeneration(config)


@torch.no_grad()
def mean_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted cross-entropy over fixed batches (the held-out set, corrupted once, both
    objectives mixed as in training)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train()
    return total / tokens


def _stamp_matches(out: Path, want: dict) -> dict | None:
    path = out / "pretrain.json"
    if path.is_file() and (out / "model.safetensors").is_file():
        stamp = json.loads(path.read_text())
        if stamp.get("config") == want:
            return stamp
    return None


def pretrain(out_dir: str | Path, data_dir: str, cfg: PretrainConfig | None = None, log=print) -> dict:
    """Build the tokenizer, pretrain, save model + tokenizer to ``out_dir``; reuse a finished
    build with the same settings and data folder. Returns the stamp (losses, size, time)."""
    cfg = cfg or PretrainConfig()
    out = Path(out_dir)
    want = {**dataclasses.asdict(cfg), "corpus_tasks": list(CORPUS_TASKS), "data_dir": str(Path(data_dir).resolve())}
    if stamp := _stamp_matches(out, want):
        log(f"backbone: reusing {out} (held-out loss {stamp['heldout_loss_final']:.3f})")
        return stamp
    t0 = time.time()
    texts_by_task = corpus(data_dir, cfg.max_texts_per_task, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    texts = [t for task in CORPUS_TASKS for t in texts_by_task[task]]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    heldout_texts, train_texts = texts[: cfg.heldout], texts[cfg.heldout:]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(train_texts, out, cfg)
    sentinels = tok.convert_tokens_to_ids(sentinel_tokens(cfg.sentinels))
    encode = lambda rows: [ids[: cfg.max_length] for ids in tok(rows, add_special_tokens=False)["input_ids"]]
    train_ids = [ids for ids in encode(train_texts) if len(ids) >= 2]
    heldout_ids = [ids for ids in encode(heldout_texts) if len(ids) >= 2]
    held_rng = np.random.default_rng(cfg.seed + 1)  # the held-out set is corrupted once, the same every time
    held = [collate([make_example(ids, sentinels, tok.eos_token_id, cfg, held_rng) for ids in heldout_ids[i:i + 64]],
                    tok.pad_token_id) for i in range(0, len(heldout_ids), 64)]

    torch.manual_seed(cfg.seed)
    model = make_model(tok, cfg)
    initial = mean_loss(model, held)
    log(f"pretrain: {len(train_ids)} texts, {sum(map(len, train_ids))} tokens, vocab {len(tok)}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, held-out loss {initial:.3f}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # warmup, then linear decay to 10 %
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.1, 1 - s / cfg.steps))
    curve, running = [], []
    model.train()
    for step in range(cfg.steps):
        picks = rng.integers(len(train_ids), size=cfg.batch_size)
        batch = collate([make_example(train_ids[i], sentinels, tok.eos_token_id, cfg, rng) for i in picks],
                        tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step == cfg.steps - 1:
            curve.append({"step": step + 1, "train_loss": round(float(np.mean(running)), 4)})
            running = []
            log(f"pretrain step {step + 1} loss {curve[-1]['train_loss']:.3f} ({time.time() - t0:.0f} s)")
    final = mean_loss(model, held)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stamp = {"config": want, "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
             "train_texts": len(train_ids), "train_tokens": sum(map(len, train_ids)),
             "texts_per_task": {t: len(v) for t, v in texts_by_task.items()},
             "heldout_loss_initial": round(initial, 4), "heldout_loss_final": round(final, 4),
             "heldout_perplexity_final": round(math.exp(final), 2), "curve": curve,
             "seconds": round(time.time() - t0, 1)}
    (out / "pretrain.json").write_text(json.dumps(stamp, indent=1) + "\n")
    log(f"pretrain: held-out loss {initial:.3f} -> {final:.3f} in {stamp['seconds']} s")
    return stamp
