"""Stage-II DTVG step time over a plain prompt-tuning step, same tiny model, same engine.

    .venv/bin/python benchmarks/step_overhead.py [--steps 40] [--sources 6 128]

One process (a world of one) under ZeRO-3 on the CPU. Both prompt modules are trained by the
same DeepSpeed engine code path on the same batches; the two are timed in alternating blocks so
that machine noise hits both alike, and the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtvg_scale.distributed import prepare_environment  # noqa: E402

prepare_environment()

import torch  # noqa: E402

from dtvg_scale import embedded  # noqa: E402
from dtvg_scale.backbone import PromptedModel, load_backbone, read_embedding_rows, resolve_model_path  # noqa: E402
from dtvg_scale.config import Stage2Args  # noqa: E402
from dtvg_scale.data import collate_train, encode_examples  # noqa: E402
from dtvg_scale.distributed import init_distributed  # noqa: E402
from dtvg_scale.engine import build_engine, resolve_ds_config  # noqa: E402
from dtvg_scale.prompts import DTVGPrompt, SoftPrompt, sample_init_prompt  # noqa: E402

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}, "gradient_clipping": 1.0}


def build(kind: str, num_sources: int, model_path: str, length: int, batch_size: int):
    loop = Stage2Args(steps=10**6, batch_size=batch_size, warmup_steps=0)
    hidden = embedded_hidden = 64
    largest = max(length * hidden, num_sources * length)
    ds_config = resolve_ds_config(ZERO3, loop, 1, torch.float32, largest)
    backbone = load_backbone(model_path, "embedded:t5", ds_config, torch.float32)
    init = read_embedding_rows(backbone.model, lambda w: sample_init_prompt(w, length, 5000, 42))
    generator = torch.Generator().manual_seed(0)
    if kind == "plain":
        module = SoftPrompt(init)
        groups = [{"params": [module.prompt], "lr": 0.3}]
    else:
        source_tvs = 0.1 * torch.randn(num_sources, length, embedded_hidden, generator=generator)
        target = init + 0.1 * torch.randn(length, embedded_hidden, generator=generator)
        module = DTVGPrompt(init, target, source_tvs)
        groups = [{"params": [module.prompt], "lr": 1e-3}, {"params": [module.target_scale], "lr": 1e-3},
                  {"params": [module.source_scales], "lr": 1e-3}]
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    return build_engine(prompted, groups, loop, ds_config, 0.0), backbone


def time_steps(engine, batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = engine(**batch)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def measure(num_sources: int, steps: int, length: int = 8, batch_size: int = 32) -> tuple[float, float]:
    model_path = resolve_model_path("embedded:t5", Path("runs/.backbones"), 64, 2)
    plain, backbone = build("plain", num_sources, model_path, length, batch_size)
    dtvg, _ = build("dtvg", num_sources, model_path, length, batch_size)
    task = embedded.embedded_task("emb_target", n_train=batch_size)
    examples = encode_examples(task.train, backbone.tokenizer, True, 256, 20)
    batch = collate_train(examples, backbone.tokenizer.pad_token_id, True)
    time_steps(plain, batch, 5), time_steps(dtvg, batch, 5)  # warm-up
    plain_times, dtvg_times = [], []
    for _ in range(4):  # alternate blocks
        plain_times += time_steps(plain, batch, steps // 4)
        dtvg_times += time_steps(dtvg, batch, steps // 4)
    plain.destroy(), dtvg.destroy()
    return statistics.median(plain_times), statistics.median(dtvg_times)


def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sources", type=int, nargs="+", default=[6, 128])
    args = parser.parse_args(argv)
    init_distributed()
    rows = []
    print("\nStage-II step / plain prompt-tuning step (tiny T5, batch 32, r=8, ZeRO-3, 1 rank, CPU)")
    print(f"{'K':>6}{'plain ms':>12}{'DTVG ms':>12}{'ratio':>8}")
    for k in args.sources:
        plain, dtvg = measure(k, args.steps)
        rows.append((k, plain, dtvg))
        print(f"{k:>6}{plain * 1e3:>12.2f}{dtvg * 1e3:>12.2f}{dtvg / plain:>8.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
