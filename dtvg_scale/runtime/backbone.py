"""The frozen backbone: loading (hub, local folder or embedded), freezing, and the prompted forward.

Under ZeRO-3 the model must be created inside ``zero.Init`` so that no rank ever holds all of
it; transformers does that in ``from_pretrained`` while an ``HfDeepSpeedConfig`` is alive, which
``load_backbone`` keeps alive for the caller. Reading a partitioned parameter outside its
module's forward gives an empty placeholder, so P_init is read inside ``GatheredParameters``
(the pattern of PEFT's ``gather_params_ctx``).
"""

from __future__ import annotations

import inspect
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import deepspeed
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from dtvg_scale.options import ConfigError
from dtvg_scale.runtime.gguf_backbone import GGUFError, convert_gguf, is_gguf_path
from dtvg_scale.runtime.progress import library_bars_hidden

EMBEDDED_PREFIX = "embedded:"  # tiny, random, built from a config
CONTROLLED_PREFIX = "controlled:"  # tiny, pretrained here on the controlled world (dtvg_scale.data.controlled)


class BackboneError(ValueError):
    """The backbone cannot be loaded or is not usable for prompt tuning."""


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    is_encoder_decoder: bool
    name: str  # what the user asked for (hub name, path or embedded:<family>)
    hidden_size: int
    hf_ds_config: Any = None  # keeps transformers' ZeRO-3 hook alive while the model lives


def resolve_model_path(
    name_or_path: str, cache_dir: Path, d_model: int, num_layers: int, corpus: list[str] | None = None
) -> str:
    """Turn ``embedded:<family>`` or ``controlled:<family>`` into a local folder (building or
    pretraining it once in ``cache_dir``), check local paths.

    An embedded backbone gets the word-level tokenizer of the embedded world, or, given a
    ``corpus`` (the text of real tasks), a byte-level BPE trained on it. Hub names are returned
    unchanged; transformers loads them (or from its cache). A ``.gguf`` file is converted once
    into a regular folder in the cache (``dtvg_scale.runtime.gguf_backbone``): ZeRO-3 partitions while
    loading, which needs a regular checkpoint."""
    if is_gguf_path(name_or_path):
        try:
            return str(convert_gguf(name_or_path))
        except GGUFError as err:
            raise BackboneError(str(err)) from err
    if name_or_path.startswith(CONTROLLED_PREFIX):
        from dtvg_scale.data import controlled

        return controlled.pretrained_backbone(cache_dir, embedded_family(name_or_path))
    if name_or_path.startswith(EMBEDDED_PREFIX):
        from dtvg_scale.data import random_world

        family = embedded_family(name_or_path)
        vocab = "world" if corpus is None else f"bpe{zlib.crc32(chr(0).join(corpus).encode()):08x}"
        folder = cache_dir / f"embedded_{family}_d{d_model}_l{num_layers}_{vocab}"
        tokenizer = random_world.build_tokenizer(folder.with_name(folder.name + "_tokenizer"), family, corpus)
        return random_world.build_tiny_backbone(folder, family, tokenizer, d_model=d_model, num_layers=num_layers)
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"model folder {path} has no config.json")
        return str(path)
    if looks_local:
        raise BackboneError(f"model path not found: {name_or_path}")
    return name_or_path


def embedded_family(name_or_path: str) -> str:
    """The family of an ``embedded:`` or ``controlled:`` backbone name."""
    prefix = CONTROLLED_PREFIX if name_or_path.startswith(CONTROLLED_PREFIX) else EMBEDDED_PREFIX
    family = name_or_path.removeprefix(prefix)
    if family not in ("t5", "llama"):
        raise BackboneError(f"unknown built-in backbone {name_or_path!r}; use {prefix}t5 or {prefix}llama")
    return family


def is_decoder_only(name_or_path: str) -> bool:
    """Known before anything is built: embedded names say it, other models' configs do."""
    if name_or_path.startswith((EMBEDDED_PREFIX, CONTROLLED_PREFIX)):
        return embedded_family(name_or_path) == "llama"
    return not is_encoder_decoder_config(resolve_model_path(name_or_path, Path("."), 0, 0))


def is_encoder_decoder_config(model_path: str) -> bool:
    try:
        config = AutoConfig.from_pretrained(model_path)
    except OSError as err:
        raise BackboneError(f"cannot load a model config from {model_path!r}: {err}") from err
    return bool(getattr(config, "is_encoder_decoder", False))


def hidden_size(model_path: str) -> int:
    """The width of the model's embedding rows, from its config (before any weight loads)."""
    config = AutoConfig.from_pretrained(model_path)
    for key in ("d_model", "hidden_size", "n_embd"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise ConfigError(f"cannot tell the hidden size of {model_path}")


def check_prompt_fits(model_path: str, length: int, vocab_limit: int) -> None:
    """P_init draws ``length`` distinct rows from the first ``vocab_limit`` token ids: say so before
    any model loads if there are not that many (e.g. the paper's 100 on a tiny embedded world)."""
    available = min(vocab_limit, int(AutoConfig.from_pretrained(model_path).vocab_size))
    if length > available:
        raise ConfigError(f"prompt.length={length} needs that many distinct embedding rows, but P_init is drawn from "
                          f"{available} (min of prompt.init_vocab_limit={vocab_limit} and the vocabulary of "
                          f"{model_path})")


def load_backbone(model_path: str, name: str, ds_config: dict, dtype: torch.dtype) -> Backbone:
    """Load tokenizer and model, frozen. With a ZeRO-3 ``ds_config`` the weights are
    partitioned as they load (``zero.Init`` through transformers' HfDeepSpeedConfig)."""
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = None
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # must outlive from_pretrained
    encoder_decoder = is_encoder_decoder_config(model_path)
    auto_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        with library_bars_hidden(off_terminal_only=True):  # every run loads: a bar each in a log file
            model = auto_class.from_pretrained(model_path, dtype=dtype)
    except OSError as err:
        raise BackboneError(f"cannot load backbone {name!r} from {model_path!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models often ship without one
    model.requires_grad_(False)  # frozen before any engine sees it
    hidden = model.get_input_embeddings().embedding_dim
    return Backbone(model, tokenizer, encoder_decoder, name, hidden, hf_ds_config)


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's parameters this rank holds, bytes of the whole model). A parameter
    ZeRO-3 partitioned holds its shard (``ds_tensor``) of ``ds_numel`` elements; any other is
    whole here. Tied parameters count once."""
    held = total = 0
    for param in model.parameters():
        size = param.element_size()
        if hasattr(param, "ds_tensor"):
            held += param.ds_tensor.numel() * size
            total += param.ds_numel * size
        else:
            held += param.numel() * size
            total += param.numel() * size
    return held, total


def read_embedding_rows(model: nn.Module, reader) -> Tensor:
    """Call ``reader(weight)`` on the whole input embedding table, gathering it first if ZeRO-3
    partitioned it (a no-op for ordinary parameters)."""
    weight = model.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return reader(weight.data)


class PromptedModel(nn.Module):
    """Backbone + prompt module. The prompt is prepended to the input embeddings:

    - encoder-decoder (T5): to the encoder input, with the attention mask extended;
    - decoder-only (LLaMA): to the whole sequence (input then target), with -100 labels over the
      prompt and the input, and position ids that skip padding.
    """

    def __init__(self, backbone: nn.Module, prompt: nn.Module, is_encoder_decoder: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.is_encoder_decoder = is_encoder_decoder
        # a causal LM's vocabulary projection is ~20 % of a small model's forward (SmolLM2: 49,152 x 576
        # per token) and its logits the largest activation; the loss reads them only where the next
        # token is a label, so ask transformers for those positions alone where the model allows it
        parameters = inspect.signature(backbone.forward).parameters
        self.keeps_label_logits = not is_encoder_decoder and "logits_to_keep" in parameters
        # the key/value cache's name, argument and output alike (transformers 5.24 renamed it)
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"

    def prepend(self, prompt_rows: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        rows = prompt_rows.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        prompt_mask = attention_mask.new_ones(batch, prompt_rows.shape[0])
        mask = torch.cat([prompt_mask, attention_mask], dim=1)
        inputs = {"inputs_embeds": torch.cat([rows, embeds], dim=1), "attention_mask": mask}
        if not self.is_encoder_decoder:
            inputs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return inputs

    def prepend_with_labels(self, prompt_rows: Tensor, input_ids: Tensor, attention_mask: Tensor,
                            labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``prepend``, and the labels to match: decoder-only labels get -100 over the prompt."""
        inputs = self.prepend(prompt_rows, input_ids, attention_mask)
        if not self.is_encoder_decoder:
            ignore = labels.new_full((labels.shape[0], prompt_rows.shape[0]), -100)
            labels = torch.cat([ignore, labels], dim=1)
        return inputs, labels

    def label_logits(self, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder-only: the logits that score a label token and those tokens, [B, P, V] and [B, P]
        (-100 where a row has no label). Position i scores token i + 1; only the positions where
        some row's next token is a label are computed (``logits_to_keep``), when the model allows."""
        next_tokens = labels[:, 1:]
        if not self.keeps_label_logits:
            return self.backbone(**inputs).logits[:, :-1], next_tokens
        keep = (next_tokens != -100).any(dim=0).nonzero().squeeze(1)
        return self.backbone(**inputs, logits_to_keep=keep).logits, next_tokens[:, keep]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor):
        prompt_rows, decision = self.prompt()
        inputs, labels = self.prepend_with_labels(prompt_rows, input_ids, attention_mask, labels)
        if self.is_encoder_decoder:
            return self.backbone(**inputs, labels=labels).loss, decision
        logits, targets = self.label_logits(inputs, labels)
        # transformers' causal-LM loss: float32, mean over every label token of the batch
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100)
        return loss, decision

    @torch.no_grad()
    def example_losses(self, prompt_rows: Tensor, input_ids: Tensor, attention_mask: Tensor,
                       labels: Tensor) -> tuple[Tensor, Tensor]:
        """With a given (frozen) prompt: each example's summed label-token cross-entropy [B] and
        its number of label tokens [B] (the training loss, per example instead of per batch)."""
        inputs, labels = self.prepend_with_labels(prompt_rows, input_ids, attention_mask, labels)
        if not self.is_encoder_decoder:
            logits, labels = self.label_logits(inputs, labels)
        else:
            logits = self.backbone(**inputs, labels=labels).logits
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                   reduction="none")
        return losses.sum(dim=1), (labels != -100).sum(dim=1)

    @torch.no_grad()
    def label_losses(self, prompt_rows: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     label_ids: Sequence[Sequence[int]]) -> Tensor:
        """With a given (frozen) prompt: each label's summed token cross-entropy after each input,
        [B, L]; inputs right-padded, labels tokenised as training encodes targets. The input is read
        once and shared by the labels: T5's encoder output, a causal LM's key/value cache over
        prompt and input. The numbers of ``example_losses`` on every (example, label) pair up to
        float rounding, for about 1/L of the compute (evaluation by likelihood was most of a real
        backbone's Stage-II time)."""
        batch, num_labels = input_ids.shape[0], len(label_ids)
        width = max(len(ids) for ids in label_ids)
        targets = input_ids.new_full((num_labels, width), -100)
        for row, ids in enumerate(label_ids):
            targets[row, :len(ids)] = torch.tensor(list(ids), dtype=targets.dtype)
        targets = targets.repeat(batch, 1)  # row b * L + l: label l after input b
        inputs = self.prepend(prompt_rows, input_ids, attention_mask)
        mask = inputs["attention_mask"].repeat_interleave(num_labels, dim=0)
        if self.is_encoder_decoder:
            encoded = self.backbone.get_encoder()(inputs_embeds=inputs["inputs_embeds"],
                                                  attention_mask=inputs["attention_mask"])
            shared = encoded.last_hidden_state.repeat_interleave(num_labels, dim=0)
            logits = self.backbone(encoder_outputs=(shared,), attention_mask=mask, labels=targets).logits
        else:
            # the first label token is scored by the input's last token, the others by the labels'
            # own tokens read on top of the cache; right padding: a row's last token is at len - 1
            last = inputs["attention_mask"].sum(dim=1) - 1
            keep, where = torch.unique(last, return_inverse=True)
            extra = {"logits_to_keep": keep} if self.keeps_label_logits else {}
            prefix = self.backbone(**inputs, use_cache=True, **extra)
            first = prefix.logits[torch.arange(batch, device=last.device), where if extra else last]
            logits = first.repeat_interleave(num_labels, dim=0).unsqueeze(1)
            if width > 1:
                cache = prefix[self.cache_name]
                cache.batch_repeat_interleave(num_labels)
                following = targets[:, :-1]
                positions = (last + 1).repeat_interleave(num_labels).unsqueeze(1) + torch.arange(width - 1, device=last.device)
                rest = self.backbone(input_ids=following.clamp(min=0), position_ids=positions, **{self.cache_name: cache},
                                     attention_mask=torch.cat([mask, (following != -100).long()], dim=1)).logits
                logits = torch.cat([logits, rest], dim=1)
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="none")
        return losses.sum(dim=1).view(batch, num_labels)

    @torch.no_grad()
    def generate(self, prompt_rows: Tensor, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, synced: bool):
        """Greedy generation with a given (frozen) prompt; returns only the new tokens.

        Decoder-only inputs must be left-padded. ``synced`` keeps ZeRO-3 ranks stepping
        together until all are done (a rank that stops early would hang the others)."""
        inputs = self.prepend(prompt_rows, input_ids, attention_mask)
        if not self.is_encoder_decoder:
            inputs.pop("position_ids")  # generate derives them from the attention mask
        return self.backbone.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=synced
        )
