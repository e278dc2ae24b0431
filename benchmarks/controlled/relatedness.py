"""Which relatedness signal sees the planted relations? Parameter space vs function space.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/controlled/relatedness.py --runs runs/controlled
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/controlled/relatedness.py --runs runs/controlled_llama

The controlled benchmark found that DTVG's similarity of task vectors (and every variant of it)
does not rank the planted helpful sources above the unrelated ones. This script asks whether
that is a limit of *parameter-space* comparison or of the tasks themselves. For every finished
run below ``--runs`` (the Stage-I prompts of ``<run>/main/stage1``, the frozen backbone of
``<runs>/backbone``), it scores each source k against the target with:

- parameter space, on the Stage-I task vectors (what DTVG's first Stage-II step sees):
  ``mean_dot`` (the paper) and ``centered_all`` (the ``centered`` preset);
- function space, on the target's *training* examples only (what a run may look at):
  ``transfer``: the target loss under ``P_init`` minus that under the source's own prompt
  ``P_init + T_k`` (> 0: the source's prompt already does better on the target than no training);
  ``added``: the target loss under ``P_t`` minus that under ``P_t + T_k`` (does merging T_k at
  scale 1 lower the loss?); ``grad_init``: the cosine of ``T_k`` with the descent direction
  ``-dL/dP`` at ``P_init`` (first order: does moving along T_k lower the target's loss from
  the start?).

For each signal it prints the mean score by relation, how often the two helpful sources are the
top two (``top-2 = helpful``), the AUC of helpful against the other four sources, and how often
every conflicting source ranks below every helpful one. Nothing is trained; a few forward and
backward passes per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dtvg_scale.data import controlled  # noqa: E402
from dtvg_scale.runtime.backbone import PromptedModel, load_backbone  # noqa: E402
from dtvg_scale.data.encoding import collate_train, encode_examples  # noqa: E402
from dtvg_scale.method.prompts import SoftPrompt  # noqa: E402
from dtvg_scale.method.similarities import SIMILARITIES  # noqa: E402
from dtvg_scale.method.transfer import transfer_gains  # noqa: E402
from dtvg_scale.runtime.transfer_losses import target_losses  # noqa: E402

SIGNALS = ("mean_dot", "centered_all", "transfer", "added", "grad_init")
RELATIONS = ("helpful", "unrelated", "conflicting")


def target_examples(run_config: dict, tokenizer, is_encoder_decoder: bool):
    """The target's training examples (8 in the controlled world), encoded as the run did."""
    data = run_config["data"]
    task = controlled.controlled_task(data["target"], seed=data["seed"], n_train=data["embedded_train_size"])
    return encode_examples(task.train, tokenizer, is_encoder_decoder, data["max_source_length"],
                           data["max_target_length"])


def descent_direction(model: PromptedModel, batch: dict, prompt: torch.Tensor) -> torch.Tensor:
    prompted = PromptedModel(model.backbone, SoftPrompt(prompt.detach()), model.is_encoder_decoder)
    loss, _ = prompted(**batch)
    (grad,) = torch.autograd.grad(loss, prompted.prompt.prompt)
    return -grad


def scores_of_run(run: Path, backbone) -> dict[str, dict[str, float]]:
    """signal -> source -> score (higher = more related to the target)."""
    main = run / "main"
    config = yaml.safe_load((main / "config.yaml").read_text())
    target, sources = config["data"]["target"], config["data"]["sources"]
    init = load_file(main / "init_prompt.safetensors")["init_prompt"].float()
    prompts = {name: load_file(main / "stage1" / name / "best_prompt.safetensors")["prompt"].float()
               for name in [target, *sources]}
    target_tv = prompts[target] - init
    source_tvs = torch.stack([prompts[name] - init for name in sources])
    pad_id, is_encoder_decoder = backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder
    examples = target_examples(config, backbone.tokenizer, is_encoder_decoder)
    model = PromptedModel(backbone.model, SoftPrompt(init), is_encoder_decoder).eval()  # no dropout anywhere
    scores: dict[str, dict[str, float]] = {}
    for name in ("mean_dot", "centered_all"):
        sims, _ = SIMILARITIES[name](target_tv, source_tvs)
        scores[name] = dict(zip(sources, sims.tolist(), strict=True))
    # the same measurement as stage2.ranking=transfer (one batch: all examples), and the merge at scale 1
    losses = target_losses(model, torch.cat([init[None], init + source_tvs]), examples, pad_id, len(examples), 0, 1)
    scores["transfer"] = dict(zip(sources, transfer_gains(losses[0], losses[1:]).tolist(), strict=True))
    merged = target_losses(model, torch.cat([prompts[target][None], prompts[target] + source_tvs]), examples,
                           pad_id, len(examples), 0, 1)
    scores["added"] = dict(zip(sources, transfer_gains(merged[0], merged[1:]).tolist(), strict=True))
    batch = collate_train(examples, pad_id, is_encoder_decoder)
    descent = descent_direction(model, batch, init).flatten()
    scores["grad_init"] = {k: float(torch.nn.functional.cosine_similarity(descent, tv.flatten(), dim=0))
                           for k, tv in zip(sources, source_tvs, strict=True)}
    return scores


def separation(scores: dict[str, float]) -> dict[str, float]:
    """top-2 = helpful (0/1), AUC helpful vs the rest, every conflicting below every helpful (0/1)."""
    relation = {k: controlled.relation(k) for k in scores}
    ranked = sorted(scores, key=scores.get, reverse=True)
    helpful = [k for k in scores if relation[k] == "helpful"]
    others = [k for k in scores if relation[k] != "helpful"]
    conflicting = [k for k in scores if relation[k] == "conflicting"]
    pairs = [(h, o) for h in helpful for o in others]
    auc = sum((scores[h] > scores[o]) + 0.5 * (scores[h] == scores[o]) for h, o in pairs) / len(pairs)
    return {"top2": float(set(ranked[:2]) == set(helpful)), "auc": auc,
            "conf_below": float(max(scores[c] for c in conflicting) < min(scores[h] for h in helpful))}


def table(per_run: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| signal | helpful | unrelated | conflicting | top-2 = helpful | AUC helpful vs rest | conflicting below helpful |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for signal in SIGNALS:
        by_relation = {rel: [] for rel in RELATIONS}
        seps = []
        for run_scores in per_run.values():
            for source, value in run_scores[signal].items():
                by_relation[controlled.relation(source)].append(value)
            seps.append(separation(run_scores[signal]))
        means = " | ".join(f"{statistics.mean(by_relation[rel]):+.3g}" for rel in RELATIONS)
        sep = {key: statistics.mean(s[key] for s in seps) for key in ("top2", "auc", "conf_below")}
        lines.append(f"| {signal} | {means} | {sep['top2']:.2f} | {sep['auc']:.2f} | {sep['conf_below']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="a controlled benchmark's --out folder")
    args = parser.parse_args(argv)
    runs = sorted(p.parent.parent for p in args.runs.glob("seed*/main/results.json"))
    if not runs:
        raise SystemExit(f"no finished run (seed*/main/results.json) under {args.runs}")
    folder = str(args.runs / "backbone")
    backbone = load_backbone(folder, folder, {}, torch.float32)
    per_run = {run.name: scores_of_run(run, backbone) for run in runs}
    (args.runs / "relatedness.json").write_text(json.dumps(per_run, indent=1) + "\n")
    print(f"{len(runs)} runs under {args.runs} ({', '.join(per_run)}); scores on the target's training examples\n")
    print(table(per_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
