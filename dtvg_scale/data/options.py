"""The tasks' option section (``data.*``): target, sources, where the files are, few-shot draws,
lengths, caps, evaluation mode, split overrides."""

from __future__ import annotations

from dataclasses import dataclass

from dtvg_scale.options import AT_LEAST_0, AT_LEAST_1, ConfigError, Range, option


@dataclass
class DataArgs:
    target: str = option("The target task.", default="ctl_target")
    sources: list[str] = option(
        "Source tasks (Stage-I vectors are trained for each). Paper: mnli, qnli, qqp, sst2, squad, record.",
        default_factory=lambda: [
            "ctl_help_a", "ctl_help_b", "ctl_unrel_a", "ctl_unrel_b", "ctl_conf_a", "ctl_conf_b",
        ],
    )
    seed: int = option("Seed of the data order and of the embedded suite.", AT_LEAST_0, default=0)
    local_dir: str | None = option(
        "Read benchmark tasks from this folder of hub-schema JSONL files (<benchmark>/<task>/<split>.jsonl) "
        "instead of the hub; nothing is downloaded then.",
        Range(path="folder"), default=None,
    )
    k_shot: int | None = option(
        "Few-shot target: K training examples per class of the target, class-balanced, drawn with data.seed "
        "(sources keep their full train, capped by max_train_samples).",
        AT_LEAST_1, default=None,
    )
    split_seed: int = option("Seed of the ATTEMPT/DePT validation/test split rules (they use 42).", AT_LEAST_0,
                            default=42)
    compat_quirks: bool = option(
        "Reproduce the prior code's documented quirks (WinoGrande's second option never shown, STS-B rounded "
        "to 0.1) so numbers compare with the paper's; false fixes them.",
        default=True,
    )
    max_source_length: int = option("Input tokens kept (paper: 256).", AT_LEAST_1, default=256)
    max_target_length: int = option("Target tokens kept and new tokens generated at evaluation (paper: 20).",
                                   AT_LEAST_1, default=20)
    eval_mode: str = option(
        "How validation and test predictions are made: generate (greedy decoding, the paper) or likelihood (the "
        "class label whose tokens the model finds most likely after the input; classification tasks only, always "
        "yields a label, one forward pass per label).",
        default="generate",
    )
    max_train_samples: int | None = option("Cap on training examples per task (null: all).", AT_LEAST_1, default=None)
    max_eval_samples: int | None = option(
        "Cap on validation and test examples per task, drawn at random with data.split_seed (the same for every "
        "run seed) and kept in the split's order (null: all; quick runs only, not the paper's protocol).",
        AT_LEAST_1, default=None,
    )
    embedded_train_size: int = option("Training examples per embedded or controlled task (the controlled target "
                                     "keeps 8: it is few-shot).", AT_LEAST_1, default=512)
    embedded_eval_size: int = option("Validation and test examples per embedded task.", AT_LEAST_1, default=128)
    task_files: list[str] = option(
        "YAML files that each define a task (data files or a hub dataset, template, labels or answer field, "
        "metrics; dtvg_scale/data/task_files.py), usable as target or source by its name.",
        default_factory=list,
    )
    split_overrides: list[str] = option(
        "Explicit departures from a benchmark task's split protocol, TASK.SPLIT=OFFICIAL_SPLIT, e.g. "
        "[mnli.validation=validation_matched] where validation_mismatched is not at hand; recorded in the run.",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        if self.eval_mode not in ("generate", "likelihood"):
            raise ConfigError(f"data.eval_mode must be generate or likelihood, got {self.eval_mode!r}")
        self.overrides_by_task()

    def overrides_by_task(self) -> dict[str, dict[str, str]]:
        """``split_overrides`` as {task: {split: official split}}, checked for form only."""
        by_task: dict[str, dict[str, str]] = {}
        for item in self.split_overrides:
            key, eq, official = str(item).partition("=")
            task, dot, split = key.strip().rpartition(".")
            if not (eq and dot and task and official.strip()) or split not in ("train", "validation", "test"):
                raise ConfigError(f"data.split_overrides: {item!r} is not TASK.SPLIT=OFFICIAL_SPLIT with SPLIT one of "
                                  f"train, validation, test (e.g. mnli.validation=validation_matched)")
            if split in by_task.get(task, {}):
                raise ConfigError(f"data.split_overrides: {key.strip()!r} is given twice")
            by_task.setdefault(task, {})[split] = official.strip()
        return by_task
