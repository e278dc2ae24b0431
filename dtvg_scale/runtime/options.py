"""The runtime's option sections: the backbone (``model.*``), the soft prompt (``prompt.*``) and a
training loop (``LoopArgs``: what ``stage1.*`` and ``stage2.*`` share)."""

from __future__ import annotations

from dataclasses import dataclass

from dtvg_scale.options import AT_LEAST_0, AT_LEAST_1, ConfigError, Range, option


@dataclass
class ModelArgs:
    name_or_path: str = option(
        "Backbone: a hub name (t5-base, meta-llama/Llama-3.2-1B), a local folder, a .gguf file (converted once "
        "into a folder in the cache; `dtvg-fetch-model` fetches SmolLM2-135M-Instruct), or "
        "'embedded:t5' / 'embedded:llama' (tiny, randomly initialised, built from a config), or "
        "'controlled:t5' / 'controlled:llama' (tiny, pretrained once here on the controlled world's rules: "
        "dtvg_scale/data/controlled.py).",
        default="controlled:t5",
    )
    precision: str = option(
        "auto (bf16 where the accelerator supports it, fp32 on CPU), fp32 or bf16.", default="auto"
    )
    embedded_d_model: int = option("Width of the embedded tiny backbone.", Range(low=8), default=64)
    embedded_layers: int = option("Layers (per stack) of the embedded tiny backbone.", AT_LEAST_1, default=2)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"model.precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class PromptArgs:
    length: int = option("Soft prompt tokens r (paper: 100).", AT_LEAST_1, default=8)
    init_vocab_limit: int = option("P_init rows are drawn from the first this-many token ids.", AT_LEAST_1, default=5000)
    init_seed: int = option("Seed of the P_init draw; every task shares P_init.", AT_LEAST_0, default=42)


@dataclass
class LoopArgs:
    steps: int = option("Optimizer steps.", AT_LEAST_1, default=100)
    batch_size: int = option("Global batch size (over ranks and accumulation).", AT_LEAST_1, default=32)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", AT_LEAST_1, default=1)
    warmup_steps: int = option("Linear warmup steps, then linear decay to 0 (paper: 500).", AT_LEAST_0, default=10)
    weight_decay: float = option("AdamW weight decay.", AT_LEAST_0, default=0.0)
    eval_every: int = option("Validate (and checkpoint) every this-many steps (paper: 1000).", AT_LEAST_1, default=50)
    eval_batch_size: int = option("Examples per rank per generation batch.", AT_LEAST_1, default=64)
    log_every: int = option("Write metrics and the group trace every this-many steps.", AT_LEAST_1, default=10)
