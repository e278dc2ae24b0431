"""Evaluation by the labels' likelihood: one forward per (example, label), as the package did up to
session 8, against one read of each input shared by its labels (``PromptedModel.label_losses``:
a key/value cache over prompt and input for a causal LM, one encoder pass for T5). Both score
the same examples with the same prompt in one run, timed in alternating rounds; printed per
task: examples, labels, seconds per way (the fastest round), the ratio, the largest loss
difference and whether the predictions agree.

    # the real SmolLM2-135M-Instruct (fetched and converted once), CB (3 labels) and Rotten Tomatoes (2)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/likelihood_eval.py
    # tiny backbones, nothing fetched
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/likelihood_eval.py --backbone embedded:llama --tasks emb_target
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from dtvg_scale.runtime.distributed import prepare_environment

prepare_environment()

import torch

from dtvg_scale.runtime.backbone import PromptedModel, load_backbone, read_embedding_rows, resolve_model_path
from dtvg_scale.recipes.config import DataArgs
from dtvg_scale.data.encoding import EncodedExample, collate_inputs, collate_train, encode_examples, encode_targets
from dtvg_scale.runtime.evaluation import likelihood_predictions
from dtvg_scale.method.prompts import SoftPrompt, sample_init_prompt
from dtvg_scale.data.tasks import load_task


def per_pair_losses(model: PromptedModel, prompt: torch.Tensor, examples: list[EncodedExample],
                    label_ids, pad_id: int, batch_size: int) -> torch.Tensor:
    """[N, L]: the earlier way, one training-shaped forward per (example, label) pair."""
    per_batch, rows = max(1, batch_size // len(label_ids)), []
    for start in range(0, len(examples), per_batch):
        chunk = examples[start:start + per_batch]
        pairs = [EncodedExample(e.source_ids, ids, "") for e in chunk for ids in label_ids]
        batch = collate_train(pairs, pad_id, model.is_encoder_decoder)
        losses, _ = model.example_losses(prompt, batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows.append(losses.view(len(chunk), len(label_ids)))
    return torch.cat(rows)


def shared_losses(model: PromptedModel, prompt: torch.Tensor, examples: list[EncodedExample],
                  label_ids, pad_id: int, batch_size: int) -> torch.Tensor:
    rows = []
    for start in range(0, len(examples), batch_size):
        inputs = collate_inputs(examples[start:start + batch_size], pad_id)
        rows.append(model.label_losses(prompt, inputs["input_ids"], inputs["attention_mask"], label_ids))
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2", help="smollm2 (fetched once), embedded:llama, embedded:t5 or a path")
    parser.add_argument("--tasks", nargs="+", default=["cb", "rotten_tomatoes"])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8, help="the package's eval batch (stage.batch_size)")
    parser.add_argument("--prompt_length", type=int, default=20)
    parser.add_argument("--max_source_length", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    name = args.backbone
    if name == "smollm2":
        from dtvg_scale.recipes.fetch_model import fetch

        name = str(fetch("smollm2-135m-instruct")[0])
    path = resolve_model_path(name, ROOT / "runs" / ".backbones", 64, 2)
    backbone = load_backbone(path, name, {}, torch.float32)
    prompt = read_embedding_rows(backbone.model, lambda w: sample_init_prompt(w, args.prompt_length, 5000, 0))
    model = PromptedModel(backbone.model, SoftPrompt(prompt), backbone.is_encoder_decoder).eval()
    pad = backbone.tokenizer.pad_token_id
    print(f"{Path(path).name}: {torch.get_num_threads()} thread(s), prompt {args.prompt_length}, "
          f"inputs <= {args.max_source_length} tokens, eval batch {args.batch_size}")
    print(f"{'task':<16} {'examples':>8} {'labels':>6} {'per pair s':>10} {'shared s':>9} {'ratio':>6} "
          f"{'max |diff|':>10} {'same predictions':>16}")
    import datasets

    datasets.disable_progress_bars()  # "Generating ... split" bars between the table's rows
    for task in args.tasks:
        data = DataArgs(local_dir=args.data_dir, max_eval_samples=args.examples)
        splits = load_task(task, data, decoder_only=not backbone.is_encoder_decoder)
        encode = lambda rows: encode_examples(rows, backbone.tokenizer, backbone.is_encoder_decoder,  # noqa: E731
                                              args.max_source_length, 4)
        examples, labels = encode(splits.validation), tuple(splits.labels)
        label_ids = encode_targets(labels, backbone.tokenizer, backbone.is_encoder_decoder, 4)
        seconds: dict[str, list[float]] = {"pair": [], "shared": []}
        results = {}
        with torch.no_grad():
            for round_ in range(args.rounds):
                ways = [("pair", per_pair_losses), ("shared", shared_losses)]
                for key, way in ways if round_ % 2 == 0 else ways[::-1]:
                    start = time.perf_counter()
                    results[key] = way(model, prompt, examples, label_ids, pad, args.batch_size)
                    seconds[key].append(time.perf_counter() - start)
        same = results["pair"].argmin(1).tolist() == results["shared"].argmin(1).tolist()
        shipped = likelihood_predictions(model, prompt, examples, label_ids, labels, pad, args.batch_size, 0, 1)
        assert shipped == [labels[i] for i in results["shared"].argmin(1).tolist()]
        pair, shared = min(seconds["pair"]), min(seconds["shared"])
        print(f"{task:<16} {len(examples):>8} {len(labels):>6} {pair:>10.2f} {shared:>9.2f} {pair / shared:>6.2f} "
              f"{(results['pair'] - results['shared']).abs().max():>10.2e} {str(same):>16}")


if __name__ == "__main__":
    main()
