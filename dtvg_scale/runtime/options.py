"""The runtime's option sections: the backbone (``model.*``), the soft prompt (``prompt.*``), a
training loop (``LoopArgs``: what ``stage1.*`` and ``stage2.*`` share) and how a job runs (``run.*``:
where its outputs go, resuming, checkpoints, tracking, stopping)."""

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


@dataclass
class RunArgs:
    output_dir: str = option("Run directory: every output of the run goes below it.", Range(path="not_file"),
                            default="runs/embedded")
    stages: str = option("all (Stage I then II), stage1, or stage2 (needs Stage-I outputs).", default="all")
    stage1_dir: str | None = option("Read Stage-I outputs from here instead of <output_dir>/stage1.",
                                   Range(path="folder"), default=None)
    seed: int = option("Seed of dropout and other randomness in training.", AT_LEAST_0, default=0)
    resume: bool = option("Continue from the latest checkpoint of each run found in output_dir.", default=True)
    keep_checkpoints: int = option(
        "Checkpoints kept per run (older ones are deleted); with 2 or more a damaged newest one falls back to the "
        "previous.", AT_LEAST_1, default=2)
    zero_shot: bool = option(
        "Also score the target with no soft prompt at all (the task's template alone) on validation and test: "
        "the backbone's zero-shot score, in results.json and <output_dir>/zero_shot/.",
        default=False,
    )
    check_rank_agreement: bool = option(
        "Debug: compare every step's grouping decision across ranks with a collective and fail loudly on divergence.",
        default=False,
    )
    progress: bool = option("Show a progress bar (rank 0 only).", default=True)
    tracking: bool = option("Log every run to MLflow (rank 0 only; never stops training if MLflow fails).", default=True)
    tracking_uri: str | None = option(
        "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<parent of output_dir>/mlflow.db "
        "(`mlflow ui` in that folder shows the runs).",
        default=None,
    )
    experiment: str = option("MLflow experiment the runs are grouped under.", default="dtvg")
    stop_after: int | None = option(
        "Checkpoint and stop after this many optimizer steps of this invocation (to fit a job time limit); "
        "run the same command again to continue. SIGTERM/SIGUSR1 do the same at the end of the current step.",
        AT_LEAST_1, default=None,
    )

    def __post_init__(self) -> None:
        if self.stages not in ("all", "stage1", "stage2"):
            raise ConfigError(f"run.stages must be all, stage1 or stage2, got {self.stages!r}")
