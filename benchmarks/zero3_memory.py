"""Per-rank memory of the frozen backbone under ZeRO-3, at world size 1 and 2, against the
unsharded model (a plain ``from_pretrained``, no DeepSpeed).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/zero3_memory.py [--families t5 llama smollm2] [--return_freed_memory]

One command: it builds the backbones once (below runs/.backbones), then runs one process per
setting, because a peak RSS is a property of a whole process: the unsharded model in a plain
process, then the same model through ``dtvg_scale.runtime.backbone.load_backbone`` under ZeRO-3 (inside
``zero.Init``) with ``deepspeed --num_gpus 1`` and ``--num_gpus 2`` (ports from
``dtvg_scale.runtime.distributed.free_port``), with the project's ZeRO-3 settings and once more at W=2
with DeepSpeed's live-parameter limits tightened (``LIVE_LIMITS``: by default ZeRO-3 keeps up to
1e9 gathered parameters alive through a step, i.e. the whole of any model this small). Every
process then trains a plain soft prompt for a few steps (ZeRO-3 through ``build_engine``, the
unsharded one with a torch AdamW), so the numbers are those of a training process, not just of a
load. Per rank it reports:

- the backbone's bytes held: the sum of ZeRO-3's partitions (``p.ds_tensor``) against the full
  size (``p.ds_numel``), and, beside it, the partitions plus the whole copies alive after the
  steps (tensors below the persistence threshold, which every rank keeps whole);
- the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), whole and above the RSS the process had
  just before the model loaded (torch, DeepSpeed, the process group: the same for any model),
  and the part of that peak already reached when the load had finished.

``--return_freed_memory`` runs every process (the unsharded one too) with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so freed tensors go back to the system instead of
staying in the heap: ZeRO-3 gathers and frees every weight each step, and glibc's adaptive
threshold otherwise keeps much of that in the peak.

The backbones are random, built from configs (t5: d_model 512, 6+6 layers, d_ff 2048, ~44 M
parameters; llama: hidden 512, 8 layers, MLP 1408, ~26 M), with the embedded word-level
tokenizer, so the vocabulary (80 rows) is tiny and almost every byte is in the transformer.
``smollm2`` is the real SmolLM2-135M-Instruct (``dtvg-fetch-model``; 134.5 M
parameters, 538 MB fp32, a 49,152-row tied embedding table: 21 % of its bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dtvg_scale.runtime.distributed import free_port, prepare_environment

PROMPT_LENGTH = 20
TRAIN_STEPS = 3
GLOBAL_BATCH = 8
BACKBONE_CACHE = Path("runs/.backbones")
# what DeepSpeed's docs give as the knobs for less memory at more communication: release each
# gathered weight after use and fetch nothing ahead (the defaults: 1e9, 1e9, 5e7 elements)
LIVE_LIMITS = {"stage3_max_live_parameters": 10**6, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
MMAP_THRESHOLD = str(128 * 1024)


@dataclass(frozen=True)
class Setting:
    label: str
    kind: str  # "plain" or "zero3"
    world_size: int
    zero_extra: dict | None = None  # added to zero_optimization


SETTINGS = (
    Setting("unsharded (from_pretrained)", "plain", 1),
    Setting("ZeRO-3, W=1", "zero3", 1),
    Setting("ZeRO-3, W=2", "zero3", 2),
    Setting("ZeRO-3, W=2, live-parameter limits", "zero3", 2, LIVE_LIMITS),
)


@dataclass(frozen=True)
class Shape:
    family: str
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int


SHAPES = {
    "t5": Shape("t5", 512, 6, 8, 2048),
    "llama": Shape("llama", 512, 8, 8, 1408),
}

# ---------------------------------------------------------------- measuring, inside a worker


def current_rss_bytes() -> int:
    """VmRSS now (ru_maxrss is only the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def backbone_bytes(model) -> dict[str, int]:
    """Full size, ZeRO-3 partitions held here, and whole copies alive here (a plain model holds
    every tensor whole: partitions = full). Tied weights count once (named_parameters dedupes)."""
    full = partitions = whole_copies = 0
    for param in model.parameters():
        size = param.element_size()
        if hasattr(param, "ds_tensor"):
            full += param.ds_numel * size
            partitions += param.ds_tensor.numel() * size
            whole_copies += param.data.numel() * size  # empty unless gathered or persistent
        else:
            full += param.numel() * size
            partitions += param.numel() * size
    return {"full": full, "partitions": partitions, "held": partitions + whole_copies}


def target_batch(tokenizer, is_encoder_decoder: bool, rank: int, world_size: int) -> dict:
    from dtvg_scale.data import random_world
    from dtvg_scale.data.encoding import collate_train, encode_examples
    from dtvg_scale.runtime.sampling import rank_micro_batches

    task = random_world.embedded_task("emb_target", n_train=GLOBAL_BATCH)
    examples = encode_examples(task.train, tokenizer, is_encoder_decoder, 256, 20)
    (mine,) = rank_micro_batches(list(range(GLOBAL_BATCH)), rank, world_size, 1)
    return collate_train([examples[i] for i in mine], tokenizer.pad_token_id, is_encoder_decoder)


def hidden_size(model_path: str) -> int:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("d_model") or config["hidden_size"]  # T5 / LLaMA


def plain_worker(model_path: str) -> list[dict]:
    """The unsharded reference: plain from_pretrained, a soft prompt, a torch AdamW."""
    import torch

    from dtvg_scale.runtime.backbone import PromptedModel, load_backbone
    from dtvg_scale.method.prompts import SoftPrompt, sample_init_prompt

    torch.set_flush_denormal(True)  # as init_distributed does for the ZeRO-3 workers
    before_load = current_rss_bytes()
    backbone = load_backbone(model_path, model_path, {}, torch.float32)
    peak_after_load = peak_rss_bytes()
    module = SoftPrompt(sample_init_prompt(backbone.model.get_input_embeddings().weight, PROMPT_LENGTH))
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    optimizer = torch.optim.AdamW([module.prompt], lr=0.3)
    batch = target_batch(backbone.tokenizer, backbone.is_encoder_decoder, 0, 1)
    for _ in range(TRAIN_STEPS):
        loss, _ = prompted(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [{"rank": 0, "before_load": before_load, "peak_after_load": peak_after_load,
             **backbone_bytes(backbone.model)}]


def zero3_worker(model_path: str, zero_extra: dict) -> dict:
    """One rank: the backbone loaded as train.py loads it (zero.Init), a prompt trained by the
    project's engine."""
    import torch

    from dtvg_scale.runtime.backbone import PromptedModel, load_backbone, read_embedding_rows
    from dtvg_scale.recipes.config import Stage1Args
    from dtvg_scale.runtime.distributed import init_distributed
    from dtvg_scale.runtime.ds_config import resolve_ds_config
    from dtvg_scale.runtime.engine import build_engine
    from dtvg_scale.method.prompts import SoftPrompt, sample_init_prompt

    ctx = init_distributed()
    before_load = current_rss_bytes()
    loop = Stage1Args(steps=TRAIN_STEPS, batch_size=GLOBAL_BATCH, warmup_steps=0)
    raw = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto", **zero_extra}}
    # the threshold keeps the prompt whole and shards every larger tensor, as train.py resolves it
    ds_config = resolve_ds_config(raw, loop, ctx.world_size, torch.float32, PROMPT_LENGTH * hidden_size(model_path))
    backbone = load_backbone(model_path, model_path, ds_config, torch.float32)
    peak_after_load = peak_rss_bytes()
    init = read_embedding_rows(backbone.model, lambda w: sample_init_prompt(w, PROMPT_LENGTH))
    module = SoftPrompt(init)
    prompted = PromptedModel(backbone.model, module, backbone.is_encoder_decoder)
    engine = build_engine(prompted, [{"params": [module.prompt], "lr": 0.3}], loop, ds_config, 0.0)
    batch = target_batch(backbone.tokenizer, backbone.is_encoder_decoder, ctx.rank, ctx.world_size)
    for _ in range(TRAIN_STEPS):
        loss, _ = engine(**batch)
        engine.backward(loss)
        engine.step()
    report = {"rank": ctx.rank, "before_load": before_load, "peak_after_load": peak_after_load,
              **backbone_bytes(backbone.model)}
    engine.destroy()  # before the process group goes (an abort at exit otherwise)
    return report


def run_worker(kind: str, model_path: str, zero_extra: dict, out: Path) -> None:
    prepare_environment()
    reports = plain_worker(model_path) if kind == "plain" else [zero3_worker(model_path, zero_extra)]
    for report in reports:  # the peak last: everything above has happened by now
        report["peak"] = peak_rss_bytes()
        (out / f"{kind}_rank{report['rank']}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------- driving, one process per setting


def build_backbone(shape: Shape | str) -> str:
    from dtvg_scale.data import random_world

    if shape == "smollm2":
        from dtvg_scale.recipes.fetch_model import fetch

        return str(fetch("smollm2-135m-instruct")[1])

    folder = BACKBONE_CACHE / (f"memory_{shape.family}_d{shape.d_model}_l{shape.num_layers}"
                               f"_h{shape.num_heads}_ff{shape.d_ff}")
    tokenizer = random_world.build_tokenizer(folder.with_name(folder.name + "_tokenizer"), shape.family)
    return random_world.build_tiny_backbone(folder, shape.family, tokenizer, d_model=shape.d_model,
                                        num_layers=shape.num_layers, num_heads=shape.num_heads, d_ff=shape.d_ff)


def launch(setting: Setting, model_path: str, out: Path, return_freed_memory: bool) -> list[dict]:
    """One setting in its own process(es); returns every rank's report."""
    script = [str(Path(__file__).resolve()), "--worker", setting.kind, "--model", model_path, "--out", str(out),
              "--zero_extra", json.dumps(setting.zero_extra or {})]
    if setting.kind == "plain":
        command = [sys.executable, *script]
    else:
        launcher = Path(sys.executable).with_name("deepspeed")
        command = [str(launcher), "--num_gpus", str(setting.world_size), "--master_port", str(free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if return_freed_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    for stale in out.glob("*_rank*.json"):
        stale.unlink()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{setting.label} failed (exit {done.returncode})")
    return [json.loads(path.read_text()) for path in sorted(out.glob(f"{setting.kind}_rank*.json"))]


def mb(value: float) -> str:
    return f"{value / 2**20:.1f}"


def table_rows(label: str, reports: list[dict], reference: dict) -> list[str]:
    rows = []
    ref_above = reference["peak"] - reference["before_load"]
    for report in reports:
        above = report["peak"] - report["before_load"]
        rows.append(
            f"| {label} | {report['rank']} | {mb(report['full'])} | {mb(report['partitions'])} "
            f"| {report['partitions'] / reference['full']:.3f} | {report['held'] / reference['full']:.3f} "
            f"| {mb(report['peak'])} | {report['peak'] / reference['peak']:.3f} "
            f"| {mb(above)} | {above / ref_above:.3f} | {mb(report['peak_after_load'] - report['before_load'])} |"
        )
    return rows


def measure_family(shape: Shape | str, out: Path, return_freed_memory: bool) -> list[str]:
    model_path = build_backbone(shape)
    reports = [(setting, launch(setting, model_path, out, return_freed_memory)) for setting in SETTINGS]
    (reference,) = reports[0][1]  # the unsharded run
    described = ("smollm2: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)" if shape == "smollm2" else
                 f"{shape.family}: d_model {shape.d_model}, {shape.num_layers} layers, {shape.num_heads} heads, "
                 f"d_ff {shape.d_ff}")
    setting_line = (f"\n{described}, {reference['full'] / 4 / 1e6:.1f} M parameters (fp32), prompt r = "
                    f"{PROMPT_LENGTH}, {TRAIN_STEPS} training steps, global batch {GLOBAL_BATCH}"
                    f"{', MALLOC_MMAP_THRESHOLD_=' + MMAP_THRESHOLD if return_freed_memory else ''}\n")
    header = ("| setting | rank | backbone MB | partitions MB | partitions / unsharded | held incl. whole copies "
              "/ unsharded | peak RSS MB | peak RSS / unsharded | peak above pre-load MB | above pre-load / unsharded "
              "| of it, peak by the end of the load MB |")
    lines = [setting_line, header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting, rank_reports in reports:
        lines += table_rows(setting.label, rank_reports, reference)
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=[*sorted(SHAPES), "smollm2"], default=["t5"])
    parser.add_argument("--return_freed_memory", action="store_true",
                        help="run every process with MALLOC_MMAP_THRESHOLD_ fixed (see the docstring)")
    parser.add_argument("--worker", choices=["plain", "zero3"], help=argparse.SUPPRESS)  # a measured process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--zero_extra", type=json.loads, default={}, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args.worker, args.model, args.zero_extra, args.out)
        return
    print("Backbone memory per rank under ZeRO-3 vs the unsharded model (CPU, fp32); ratios to the unsharded run.")
    with tempfile.TemporaryDirectory(prefix="zero3_memory-") as tmp:
        for family in args.families:
            shape = family if family == "smollm2" else SHAPES[family]
            print("\n".join(measure_family(shape, Path(tmp), args.return_freed_memory)), flush=True)


if __name__ == "__main__":
    main()
