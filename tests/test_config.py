"""Options: one source of truth, YAML + key=value, clear errors, --help, shipped configs."""

import json
from pathlib import Path

import pytest

from dtvg_scale.recipes.config import Config, ConfigError, build_config, describe_options, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_embedded_default():
    cfg = Config()
    assert cfg.model.name_or_path == "controlled:t5"  # pretrained here on its own task family
    assert cfg.data.target == "ctl_target" and len(cfg.data.sources) == 6
    assert cfg.stage2.strategies == ["dtvg", "positive_only", "target_only", "all_sources", "fixed_group", "spot",
                                     "dtvg-transfer"]
    assert cfg.stage2.threshold == 0.0 and cfg.stage2.kc_weight is None
    with_presets = ["dtvg-centered", "fixed_group-transfer"]  # a merging strategy may carry a preset
    assert build_config({"stage2.strategies": with_presets}).stage2.strategies == with_presets


def test_the_stage2_knobs_default_to_the_methods_paper_setting():
    """One source of truth: the job's stage2.* knobs start at method.config.PAPER."""
    import dataclasses

    from dtvg_scale.method.config import PAPER

    paper = {k: v for k, v in dataclasses.asdict(PAPER).items() if k != "strategy"}
    assert Config().stage2.method_knobs() == paper
    assert Config().stage2.dtvg_config("dtvg") == PAPER


def test_overrides_yaml_values_and_shorthand(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("stage2:\n  threshold: 0.1\n  kc_weight: 0.5\nprompt:\n  length: 100\n")
    cfg = load_config(str(config_file), ["stage2.threshold=0.2", "sources=[emb_help_a]", "max_group_size=2",
                                         "run.check_rank_agreement=true"])
    assert cfg.stage2.threshold == 0.2  # the command line wins over the file
    assert cfg.stage2.kc_weight == 0.5 and cfg.prompt.length == 100
    assert cfg.data.sources == ["emb_help_a"] and cfg.stage2.max_group_size == 2
    assert cfg.run.check_rank_agreement is True
    assert build_config({"stage2.kc_weight": None}).stage2.kc_weight is None
    # YAML reads 1e-3 as a string (its floats need a dot): still the number the paper writes so
    assert load_config(None, ["stage2.prompt_lr=1e-3", "prompt.length='7'"]).stage2.prompt_lr == 0.001
    assert build_config({"prompt.length": "7", "data.sources": "emb_help_a"}).prompt.length == 7


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stage2.treshold": 0.1}, "did you mean stage2.threshold"),
        ({"stage2.strategies": ["dtvg", "magic"]}, "unknown strategy 'magic'"),
        ({"stage2.strategies": ["dtvg-best"]}, "strategy 'dtvg-best': unknown preset 'best'; known: paper, centered"),
        ({"stage2.strategies": ["spot-transfer"]}, "a preset applies to merging strategies"),
        ({"prompt.length": "long"}, "must be an integer"),
        ({"run.resume": "maybe"}, "run.resume must be true or false, got 'maybe'"),
        ({"data.sources": [["a"]]}, "data.sources must be a list, got"),  # of names
        ({"stage1.steps": 0}, "stage1.steps must be an integer >= 1, got 0"),
        ({"model.precision": "fp8"}, "precision"),
        ({"steps": 3}, "unknown option 'steps'"),  # ambiguous: stage1 or stage2
        ({"data.eval_mode": "beam"}, "data.eval_mode must be generate or likelihood"),
        ({"stage2.scale_init": "constant"}, "stage2.scale_init=constant needs stage2.scale_value"),
        ({"stage2.scale_value": 0.5}, "stage2.scale_value is for stage2.scale_init=constant only"),
        ({"stage2.selection": "exact", "data.sources": [f"s{i}" for i in range(17)]},
         "stage2.selection=exact enumerates every subset of the sources: at most 16, got 17"),
    ],
)
def test_bad_options_fail_with_one_clear_message(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


@pytest.mark.parametrize("key, value, accepted", [
    ("prompt.length", -3, "an integer >= 1"),
    ("stage1.lr", -0.1, "a number > 0"),
    ("stage2.prompt_lr", 0, "a number > 0"),
    ("stage2.source_scale_lr", -1e-3, "a number > 0"),
    ("data.k_shot", 0, "an integer >= 1 or null"),
    ("data.max_source_length", 0, "an integer >= 1"),
    ("data.max_target_length", 0, "an integer >= 1"),
    ("data.max_train_samples", 0, "an integer >= 1 or null"),
    ("data.max_eval_samples", -1, "an integer >= 1 or null"),
    ("data.seed", -1, "an integer >= 0"),
    ("stage2.warmup_steps", -5, "an integer >= 0"),
    ("stage1.weight_decay", -0.1, "a number >= 0"),
    ("stage1.min_score", 1.5, "a number in [0, 1] or null"),
    ("stage2.temperature", 0, "a number > 0"),
    ("stage2.kc_weight", -1, "a number >= 0 or null"),
    ("stage2.max_group_size", 0, "an integer >= 1 or null"),
    ("run.keep_checkpoints", 0, "an integer >= 1"),
    ("run.stop_after", 0, "an integer >= 1 or null"),
    ("model.embedded_d_model", 4, "an integer >= 8"),
    ("data.local_dir", "/no/such/folder", "an existing folder or null"),
    ("run.stage1_dir", "/no/such/folder", "an existing folder or null"),
    ("run.output_dir", __file__, "a folder (existing or new), not a file"),
])
def test_every_option_is_checked_against_its_range(key, value, accepted):
    with pytest.raises(ConfigError) as caught:
        build_config({key: value})
    assert str(caught.value) == f"{key} must be {accepted}, got {value!r}" or (
        isinstance(value, int) and str(caught.value) == f"{key} must be {accepted}, got {float(value)!r}")


def test_a_finished_runs_config_loads_where_its_folders_are_gone(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  local_dir: /data/moved\n")
    with pytest.raises(ConfigError, match="data.local_dir must be an existing folder"):
        load_config(str(tmp_path / "config.yaml"), [])
    assert load_config(str(tmp_path / "config.yaml"), [], check_paths=False).data.local_dir == "/data/moved"


def test_help_documents_every_option():
    text = describe_options()
    for section, args in Config().to_dict().items():
        for key in args:
            assert f"{section}.{key} " in text


def test_shipped_configs_parse():
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert shipped, "configs/ holds the paper's protocol"
    for path in shipped:  # parsed, not run: a Stage-II config names the Stage-I folder its first step makes
        load_config(str(path), [], check_paths=False)
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        from dtvg_scale.runtime.ds_config import load_ds_config

        assert load_ds_config(str(path))["zero_optimization"]["stage"] in (2, 3)
        json.loads(path.read_text())


def test_split_overrides_parse_per_task_and_refuse_bad_or_repeated_ones():
    data = load_config(None, ["data.split_overrides=[mnli.validation=validation_matched, qqp.test=validation]"]).data
    assert data.overrides_by_task() == {"mnli": {"validation": "validation_matched"}, "qqp": {"test": "validation"}}
    for bad, message in [("[mnli.dev=validation_matched]", "not TASK.SPLIT=OFFICIAL_SPLIT"),
                         ("[mnli.validation]", "not TASK.SPLIT=OFFICIAL_SPLIT"),
                         ("[mnli.test=a, mnli.test=b]", "'mnli.test' is given twice")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"data.split_overrides={bad}"])


def test_preset_sets_its_knobs_and_explicit_knobs_win():
    assert load_config(None, []).stage2.similarity == "mean_dot"  # the paper stays the default
    centered = load_config(None, ["stage2.preset=centered"]).stage2
    assert (centered.preset, centered.similarity, centered.merge) == ("centered", "centered_all", "sum")
    explicit = load_config(None, ["stage2.similarity=centered_sources", "stage2.preset=centered"]).stage2
    assert explicit.similarity == "centered_sources"
    transfer = load_config(None, ["stage2.preset=transfer"]).stage2
    assert (transfer.ranking, transfer.similarity) == ("transfer", "mean_dot")
    with pytest.raises(ConfigError, match="unknown stage2.ranking 'loss'"):
        load_config(None, ["stage2.ranking=loss"])
    with pytest.raises(ConfigError, match="unknown stage2.preset 'best'; known: paper, centered, transfer"):
        load_config(None, ["stage2.preset=best"])
