"""Every option of a run, in one place: dataclasses filled from YAML and ``key=value`` overrides.

The defaults are the *embedded default*: a tiny T5 pretrained here once (seconds) on the
controlled world's rules and that world's held-out tasks (``dtvg_scale/data/controlled.py``), small
enough to run both stages on 2 CPU cores in minutes. Where the paper's protocol
differs, the help text gives the paper's value; ``configs/`` holds YAML files with them.

Command line: ``train.py [--config FILE.yaml] [--ds_config FILE.json] [section.key=value ...]``.
A key may omit its section when the name is unique (``target=ctl_target``); values are parsed
as YAML (``sources=[a,b]``, ``kc_weight=null``), then typed by OmegaConf's structured config of
the dataclasses (``prompt_lr=1e-3`` is a number). What OmegaConf does not know is here: the
bare keys and "did you mean", a single name as a one-element list, each option's ``Range``, the
presets, and one-line errors naming the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtvg_scale.data.options import DataArgs
from dtvg_scale.method.config import KNOB_BOUNDS, PAPER, VARIANT_KNOBS, DTVGConfig, check_knobs, split_strategy
from dtvg_scale.method.selection import EXACT_MAX_SOURCES
from dtvg_scale.method.strategies import STRATEGIES
from dtvg_scale.options import ABOVE_0, AT_LEAST_0, AT_LEAST_1, UNIT_INTERVAL, ConfigError, Range, option, type_words
from dtvg_scale.runtime.options import LoopArgs, ModelArgs, PromptArgs, RunArgs


def knob_range(knob: str) -> Range:
    """The method's bounds of a numeric knob (``method.config.KNOB_BOUNDS``) as an option's Range."""
    lowest, strict = KNOB_BOUNDS[knob]
    return Range(low=lowest, open_low=strict)


@dataclass
class Stage1Args(LoopArgs):
    lr: float = option("Prompt learning rate (paper: 0.3).", ABOVE_0, default=0.3)
    weight_decay: float = option("AdamW weight decay (paper: 1e-5).", AT_LEAST_0, default=1e-5)
    min_score: float | None = option(
        "Quality gate (not in the paper): a source whose best validation score (mean of its metrics, 0..1) "
        "stays below this is retrained with another seed, then excluded from Stage II; null: off.",
        UNIT_INTERVAL, default=None,
    )
    gate_retries: int = option("Retrainings a source below stage1.min_score gets before it is excluded.", AT_LEAST_0,
                              default=1)


@dataclass
class Stage2Args(LoopArgs):
    strategies: list[str] = option(
        f"Stage-II strategies to run, each from the same Stage-I vectors: {', '.join(STRATEGIES)}; a merging one "
        "may add a preset after a dash (dtvg-transfer: DTVG with stage2.preset=transfer's knobs over the job's).",
        default_factory=lambda: [*STRATEGIES, "dtvg-transfer"],
    )
    batch_size: int = option("Global batch size (paper: 16).", AT_LEAST_1, default=16)
    prompt_lr: float = option("Target prompt learning rate (paper: 1e-3).", ABOVE_0, default=1e-2)
    target_scale_lr: float = option("Learning rate of the target's per-token scales (paper: 1e-3).", ABOVE_0,
                                   default=1e-2)
    source_scale_lr: float = option("Learning rate of the sources' per-token scales (paper: 1e-3).", ABOVE_0,
                                   default=1e-2)
    spot_lr: float = option("Prompt learning rate of the SPoT baseline (plain prompt tuning).", ABOVE_0, default=0.3)
    threshold: float = option("Sources with similarity >= threshold are candidates.", default=PAPER.threshold)
    kc_weight: float | None = option(
        "null: the code's rule (knowledge consistency alone); a number lambda: the paper's TS + lambda*KC.",
        knob_range("kc_weight"), default=PAPER.kc_weight,
    )
    max_group_size: int | None = option("Cap on the group size (null: none).", knob_range("max_group_size"),
                                        default=PAPER.max_group_size)
    similarity: str = option(
        f"Task-vector similarity: {', '.join(VARIANT_KNOBS['similarity'])} (default the paper's "
        f"{PAPER.similarity}; dtvg_scale/method/similarities.py).",
        default=PAPER.similarity,
    )
    selection: str = option(
        "Group selection: greedy_prefix (the paper), exact (best TS + lambda*KC over all subsets, K <= 16; "
        "lambda = kc_weight or 1), top_k.",
        default=PAPER.selection,
    )
    top_k: int | None = option("Group size of selection=top_k.", knob_range("top_k"), default=PAPER.top_k)
    merge: str = option("Merge of the selected vectors: sum (the paper), mean, softmax (over similarities).",
                         default=PAPER.merge)
    temperature: float = option("Softmax temperature of merge=softmax.", knob_range("temperature"),
                                default=PAPER.temperature)
    scale_init: str = option("Initial source scales: ones (the paper), uniform (1/K), zeros, constant "
                            "(stage2.scale_value).", default=PAPER.scale_init)
    scale_value: float | None = option("Every source scale's start with stage2.scale_init=constant (only then).",
                                      default=PAPER.scale_value)
    ranking: str = option(
        "What ranks and thresholds the sources: task_vector (the paper: similarity of task vectors) or transfer "
        "(the target's training loss under each source's own Stage-I prompt, measured once before Stage II: "
        "gain = L(P_init) - L(P_init + T_k); threshold then applies to the gain; KC still uses similarity).",
        default=PAPER.ranking,
    )
    transfer_examples: int = option("Target training examples ranking=transfer scores each source on (the first N).",
                                   AT_LEAST_1, default=256)
    preset: str = option(
        "A named set of the knobs above: paper (the default, the authors' code), centered (similarity="
        "centered_all: kept conflicting sources out of the group) or transfer (ranking=transfer: ranked the "
        "planted helpful sources first); docs/results.md. Knobs given explicitly win over the preset.",
        default="paper",
    )

    def __post_init__(self) -> None:
        try:  # the method's one check of its knobs, named as options here
            check_knobs({"preset": self.preset, **self.method_knobs()}, prefix="stage2.")
            for name in self.strategies:
                split_strategy(name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not self.strategies:
            raise ConfigError("stage2.strategies is empty")

    def method_knobs(self) -> dict[str, Any]:
        """This section's values of DTVGConfig's knobs (all but the strategy)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DTVGConfig) if f.name != "strategy"}

    def dtvg_config(self, strategy: str) -> DTVGConfig:
        """The merged prompt's knobs for one merging strategy of this section."""
        return DTVGConfig(strategy, **self.method_knobs())


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    stage1: Stage1Args = field(default_factory=Stage1Args)
    stage2: Stage2Args = field(default_factory=Stage2Args)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        # K is known now, so this need not wait for Stage II's first step (Stage I's gate only removes sources)
        if self.stage2.selection == "exact" and len(self.data.sources) > EXACT_MAX_SOURCES:
            raise ConfigError(f"stage2.selection=exact enumerates every subset of the sources: at most "
                              f"{EXACT_MAX_SOURCES}, got {len(self.data.sources)} (use greedy_prefix or top_k)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _all_keys() -> dict[str, tuple[str, str]]:
    """Every accepted key -> (section, field); unique bare field names are accepted too."""
    keys: dict[str, tuple[str, str]] = {}
    bare: dict[str, list[tuple[str, str]]] = {}
    for section, section_cls in _section_types().items():
        for name in _field_types(section_cls):
            keys[f"{section}.{name}"] = (section, name)
            bare.setdefault(name, []).append((section, name))
    for name, places in bare.items():
        if len(places) == 1:
            keys.setdefault(name, places[0])
    return keys


def build_config(values: dict[str, Any] | None = None, check_paths: bool = True) -> Config:
    """Build a validated Config from flat ``{"section.key": value}`` entries (later ones win).
    ``check_paths=False`` reads a finished run's config without asking its folders to exist here."""
    known = _all_keys()
    chosen: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in (values or {}).items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see --help"
            raise ConfigError(f"unknown option {key!r}{hint}")
        section, name = known[key]
        chosen[section][name] = value
    _apply_preset(chosen["stage2"])
    typed = {section: _typed(section, given) for section, given in chosen.items()}
    for section, given in typed.items():  # before any dataclass check: a range error names its option
        _check_ranges(section, given, check_paths)
    return Config(**{section: cls(**typed[section]) for section, cls in _section_types().items()})


def _typed(section: str, given: dict[str, Any]) -> dict[str, Any]:
    """The given values of one section converted to its fields' types by OmegaConf's structured
    config (``"1e-3"`` is a number, ``"yes"`` a boolean; ``"long"`` is no integer): one error, naming
    the option and what it takes, at the first value that does not convert."""
    if not given:  # nothing to type: skip building the section's structured config
        return {}
    section_cls = _section_types()[section]
    fields = _field_types(section_cls)
    typed = OmegaConf.structured(section_cls)
    for name, value in given.items():
        if isinstance(value, str) and typing.get_origin(fields[name]) is list:
            value = [value]  # a single name is a one-element list
        try:
            OmegaConf.update(typed, name, value, merge=False)  # converts, or refuses, against the field's type
        except OmegaConfBaseException:
            raise ConfigError(f"{section}.{name} must be {type_words(fields[name])}, got {given[name]!r}") from None
    values = OmegaConf.to_container(typed)
    return {name: values[name] for name in given}


def _check_ranges(section: str, given: dict[str, Any], check_paths: bool) -> None:
    """Each given value against its field's ``Range`` (defaults are in range by construction)."""
    fields = {f.name: f for f in dataclasses.fields(_section_types()[section])}
    for name, value in given.items():
        check = fields[name].metadata.get("check")
        if check is None or value is None or (check.path and not check_paths) or check.accepts(value):
            continue
        annotation = _field_types(_section_types()[section])[name]
        optional = type(None) in typing.get_args(annotation)
        raise ConfigError(f"{section}.{name} must be {check.describe(annotation)}"
                          f"{' or null' if optional else ''}, got {value!r}")


def _apply_preset(stage2: dict[str, Any]) -> None:
    """Fill the knobs of ``stage2.preset`` that were not given explicitly (an unknown preset is
    left for Stage2Args to refuse)."""
    from dtvg_scale.method.config import PRESETS

    for knob, value in PRESETS.get(stage2.get("preset", "paper"), {}).items():
        stage2.setdefault(knob, value)


def flatten_yaml(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"stage2": {"threshold": 0.1}}`` -> ``{"stage2.threshold": 0.1}``."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config file must hold a mapping of sections, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix and key in SECTIONS:
            flat.update(flatten_yaml(value, prefix=f"{full}."))
        else:
            flat[full] = value
    return flat


def parse_overrides(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return values


def load_config(config_file: str | None, overrides: list[str], check_paths: bool = True) -> Config:
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values.update(flatten_yaml(yaml.safe_load(path.read_text()) or {}))
    values.update(parse_overrides(overrides))
    return build_config(values, check_paths)


def describe_options() -> str:
    """The --help text: every option with its type, default and meaning."""
    lines = []
    for section, section_cls in _section_types().items():
        lines.append(f"\n{section}:")
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            default = getattr(defaults, f.name)
            annotation = str(_field_types(section_cls)[f.name]).replace("typing.", "")
            annotation = getattr(_field_types(section_cls)[f.name], "__name__", annotation)
            lines.append(f"  {section}.{f.name} ({annotation}, default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
