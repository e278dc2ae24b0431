"""A job's summary: ``results.json`` (every run's scores, the DTVG group over time, the share of
steps each source was in the group), the table ``train.py`` prints, and the job's columns in the
MLflow runs table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtvg_scale.data.tasks import task_relation
from dtvg_scale.outputs import group_trace

if TYPE_CHECKING:  # the job's options; read here, made by the recipes
    from dtvg_scale.recipes.config import Config


def summarize(cfg: Config, stage1: dict, stage2: dict, zero_shot: dict | None = None,
              max_spans: int = 12) -> tuple[dict[str, Any], str]:
    out = Path(cfg.run.output_dir)
    trace = group_trace.read_rows(out / "stage2" / "dtvg" / group_trace.FILE_NAME)
    spans, share = group_trace.run_lengths(trace), group_trace.selection_share(trace, cfg.data.sources)
    results = {"target": cfg.data.target, "sources": cfg.data.sources, "stage1": stage1, "stage2": stage2,
               "dtvg_group_over_time": spans, "dtvg_selection_share": share,
               **({"zero_shot": zero_shot} if zero_shot else {})}
    metric = (stage1.get(cfg.data.target) or next(iter(stage2.values()), {})).get("reported_metric", "accuracy")
    how = " (predictions by label likelihood)" if cfg.data.eval_mode == "likelihood" else ""
    lines = [f"Target {cfg.data.target}: {metric} of the best-validation prompt{how}"]
    lines.append(f"  {'run':<24}{'validation':>12}{'test':>10}  group at the best step")
    rows = [("zero-shot (no prompt)", zero_shot)] if zero_shot else []
    rows += ([("prompt tuning (Stage I)", stage1[cfg.data.target])] if cfg.data.target in stage1 else [])
    rows += list(stage2.items())
    lines += [f"  {label:<24}{r['validation'][metric]:>12.3f}{r['test'][metric]:>10.3f}  {_group_cell(r)}"
              for label, r in rows]
    if stage1:  # sources are scored on validation only (they have no test split)
        lines.append("Stage-I best validation score per task: " + ", ".join(
            f"{t} {r['validation'][r['reported_metric']]:.3f}" for t, r in stage1.items()))
    shares = {name: share if name == "dtvg" else group_trace.selection_share(
                  group_trace.read_rows(out / "stage2" / name / group_trace.FILE_NAME), cfg.data.sources)
              for name in stage2 if name == "dtvg" or name.startswith("dtvg-")}
    shares = {name: value for name, value in shares.items() if value}
    if shares:
        lines.append("Share of Stage-II steps each source was in the group")
        lines.append(f"  {'source':<16}" + "".join(f"{name:>16}" for name in shares) + "  relation")
        lines += [f"  {source:<16}" + "".join(f"{value[source]:>16.0%}" for value in shares.values())
                  + f"  {task_relation(source)}" for source in cfg.data.sources]
    if spans:
        shown = spans if len(spans) <= max_spans else [spans[round(i * (len(spans) - 1) / (max_spans - 1))] for i in range(max_spans)]
        lines.append(f"DTVG group over time ({len(spans)} stretches" + ("" if shown is spans else f", {max_spans} shown") + "):")
        lines += [f"  steps {g['first_step']:>5}-{g['last_step']:<5} {', '.join(g['group']) or '(target only)'}" for g in shown]
    return results, "\n".join(lines)


def _group_cell(result: dict) -> str:
    """What a row merged at its best step: the group (Stage II), SPoT's source, or nothing."""
    if "spot_source" in result:
        return f"starts from {result['spot_source']}"
    if "group_at_best" in result:
        return ", ".join(result["group_at_best"]) or "(target only)"
    return "-"


def runs_table_columns(cfg: Config) -> list[str]:
    """The runs table's columns: each run's final scores and group, each job's test scores."""
    job_rows = ["zero_shot", "prompt_tuning", *cfg.stage2.strategies]
    return (["metrics.`final_validation`", "metrics.`final_test`", "metrics.`final_group_size`", "tags.`group`"]
            + [f"metrics.`test_{name}`" for name in job_rows])


def job_columns(cfg: Config, stage1: dict, stage2: dict, zero_shot: dict | None) -> dict[str, float]:
    """The job's row in the runs table: the target's test score per run (its reported metric)."""
    runs = {"zero_shot": zero_shot, "prompt_tuning": stage1.get(cfg.data.target), **stage2}
    return {f"test_{name}": r["test"][r["reported_metric"]] for name, r in runs.items()
            if r and r.get("test") and r["reported_metric"] in r["test"]}
