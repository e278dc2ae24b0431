"""Real GLUE/SuperGLUE few-shot benchmark: one command, the whole table.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/real_fewshot/run.py --out runs/real_fewshot --jobs 2
    .venv/bin/python benchmarks/real_fewshot/run.py --out /tmp/rf --quick --seeds 0 --targets rte --k_shots 16

On the real pretrained backbone, SmolLM2-135M-Instruct (``--backbone smollm2``: fetched and
converted once by ``dtvg-fetch-model``; targets Rotten Tomatoes, CB and MRPC at
K = 16; predictions by the labels' likelihood; the zero-shot score of the first seed; the
``transfer`` and ``centered`` presets as variants; settings in ``SMOLLM2`` below)::

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/real_fewshot/run.py --backbone smollm2 --out runs/real_smollm2 --seeds 0 1 2

Targets RTE, CB and MRPC with K = 16 and 32 training examples per class, sources MNLI, QNLI, QQP
and SST-2 (the bundled 10k-row train subsets, capped), read in place from ``--data_dir``
(hub-schema JSONL; default ``../shared/data`` beside the repository).

1. ``--backbone tiny_t5``: pretrain a tiny T5 (span corruption + prefix LM) on the tasks' train text
   (``pretrain.py``), cached in ``<out>/backbone``; every run loads that one folder, so every run
   draws the same P_init. ``--backbone smollm2``: the GGUF file of SmolLM2-135M-Instruct.
2. Per seed s (data seed = run seed = P_init seed = s), ``dtvg_scale/train.py`` processes, world
   of one, fp32:

   * ``seed<s>/sources``: Stage I of the four sources, once, on their full (capped) train
     (``data.k_shot`` is the target's only), shared by the six target runs of the seed.
   * ``seed<s>/<target>_k<K>/main``: the sources' Stage-I folders are linked into its
     ``stage1/`` (``run.resume`` then skips them: their ``result.json`` is there), Stage I
     trains the K-shot target (plain prompt tuning), Stage II runs every strategy.
   * ``seed<s>/<target>_k<K>/<variant>``: a second Stage-II pass reusing that Stage I
     (``run.stages=stage2 run.stage1_dir=...``), e.g. ``stage2.similarity=centered_sources``.

3. Collect each run's ``result.json`` (the target's test score in its reported metric) and
   DTVG's ``group_trace.jsonl`` into ``<out>/report.md`` and ``<out>/summary.json``.

A process whose results are all there is skipped, so the same command resumes a broken table
and ``--analyse_only`` remakes the report from finished runs. ``--archive DIR`` keeps the table
beyond the machine: finished runs are copied from DIR into ``--out`` before anything starts and
from ``--out`` into DIR after every process and every ``--archive_every`` seconds (a process may
finish runs for hours; ``dtvg_scale.outputs.run_archive``: no checkpoints, no plots, a few MB per seed), so a table that takes longer than a machine lives goes on from a
committed DIR on the next machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

import analyse  # the sibling modules (this script's folder is first on sys.path)
import pretrain
from dtvg_scale.outputs import run_archive

TARGETS = ("rte", "cb", "mrpc")
SOURCES = ("mnli", "qnli", "qqp", "sst2")
K_SHOTS = (16, 32)
STRATEGIES = ("dtvg", "positive_only", "target_only", "all_sources", "fixed_group", "spot")
VARIANTS = {  # name -> (strategy, Stage-II overrides); each reuses its (target, K)'s Stage I
    "dtvg_centered_sources": ("dtvg", ("stage2.similarity=centered_sources",)),
    "preset_transfer": ("dtvg", ("stage2.preset=transfer",)),
    "preset_centered": ("dtvg", ("stage2.preset=centered",)),
}
# The bundled folder has no validation_mismatched (the protocol's MNLI validation): take the
# matched one, an explicit and recorded departure (MNLI is only a source here, it has no test).
SPLIT_OVERRIDES = {"mnli": "mnli.validation=validation_matched"}
# The sources-only process needs *some* target: one whose protocol test split is in the folder
# (QNLI's and SST-2's are their official validation). It is trained exactly like a source.
HOST_PREFERENCE = ("qnli", "sst2")


@dataclass(frozen=True)
class Settings:
    """Sized for the whole table (3 targets x 2 K x 2 seeds) on 2 CPU cores: it took 33 min with
    --jobs 2 while other jobs kept both cores busy (a Stage-I step at batch 32 x 128 tokens is
    ~0.15-0.3 s on this backbone; every process also pays ~15 s to start)."""

    prompt_length: int = 10
    max_source_length: int = 128  # RTE/CB inputs: median ~75 BPE tokens, 90th percentile ~160
    max_train_samples: int = 4000  # sources see 150 x 32 = 4800 examples: just over one epoch
    source_eval_cap: int = 200  # sources' validation (1000 carved rows / MNLI matched): model selection only
    stage1_steps: int = 150
    stage1_lr: float = 0.3  # the paper's; 0.1 left a first (span-corruption-only) backbone mute
    stage1_batch: int = 32
    stage2_steps: int = 100
    stage2_batch: int = 16
    spot_lr: float = 0.3  # SPoT is plain prompt tuning from a source prompt: Stage I's rate
    eval_every: int = 50
    pretrain: pretrain.PretrainConfig = field(default_factory=pretrain.PretrainConfig)
    backbone: str = "tiny_t5"
    stage2_eval_every: int | None = None  # null: eval_every
    target_eval_cap: int | None = None  # the target's validation and test: the first N (null: all)
    max_target_length: int = 2  # a label token + eos
    eval_mode: str = "generate"
    zero_shot: bool = False  # score the target with no prompt too (first seed only: it has no seed)
    targets: tuple[str, ...] = TARGETS
    k_shots: tuple[int, ...] = K_SHOTS
    variants: tuple[str, ...] = ("dtvg_centered_sources",)


FULL = Settings()
# SmolLM2-135M-Instruct, sized from its measured step time (fp32, 1 process x 2 threads: ~2-4 s per step
# of 8 x <=116 tokens): Stage I 100 steps at batch 8 (the paper: 30k... of batch 32), Stage II 20 steps,
# prompt 20 tokens (paper 100), inputs cut to 96 tokens keeping their end (paper 256), the target's
# validation and test capped at 200 examples, predictions by label likelihood (paper: generation).
SMOLLM2 = Settings(prompt_length=20, max_source_length=96, max_train_samples=2000, source_eval_cap=200,
                   stage1_steps=100, stage1_lr=0.3, stage1_batch=8, stage2_steps=20, stage2_batch=8, spot_lr=0.3,
                   eval_every=50, stage2_eval_every=20, backbone="smollm2", target_eval_cap=200,
                   max_target_length=4, eval_mode="likelihood", zero_shot=True,
                   targets=("rotten_tomatoes", "cb", "mrpc"), k_shots=(16,),
                   variants=("preset_transfer", "preset_centered"))
QUICK = replace(Settings(), stage1_steps=20, stage2_steps=10, eval_every=10, source_eval_cap=64,
                pretrain=replace(pretrain.PretrainConfig(), steps=30, vocab_size=2000, heldout=128))


# ------------------------------------------------------------------------------ processes

def threads() -> str:
    """One thread per process unless told otherwise: another job shares the two cores, and two
    threads on an occupied core ran several times slower (benchmarks/controlled)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


def prepare_backbone(out: Path, data_dir: Path, s: Settings, t0: float) -> str:
    """What ``model.name_or_path`` every run of the table gets."""
    if s.backbone == "smollm2":
        from dtvg_scale.recipes.fetch_model import fetch

        gguf, folder = fetch("smollm2-135m-instruct")
        print(f"backbone ready: {gguf} (converted: {folder}) at {time.time() - t0:.0f} s", flush=True)
        return str(gguf)
    stamp = pretrain.pretrain(out / "backbone", str(data_dir), s.pretrain)
    print(f"backbone ready ({stamp['heldout_loss_final']:.3f} held-out loss) at {time.time() - t0:.0f} s", flush=True)
    return str(out / "backbone")


def train(args: list[str], log: Path) -> None:
    cmd = [sys.executable, str(ROOT / "dtvg_scale" / "train.py"), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.run(cmd, check=False, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": threads()})
    if proc.returncode:
        raise SystemExit(f"train.py failed ({proc.returncode}); see {log}")


def all_done(folders: list[Path]) -> bool:
    return all((f / "result.json").is_file() for f in folders)


def base_args(backbone: str, data_dir: Path, seed: int, s: Settings, sources: tuple[str, ...]) -> list[str]:
    """Options every process of a seed shares (same backbone path string and P_init seed, so
    every task vector is measured from the same P_init)."""
    overrides = [SPLIT_OVERRIDES[t] for t in sources if t in SPLIT_OVERRIDES]
    return [
        f"model.name_or_path={backbone}", "model.precision=fp32", f"data.local_dir={data_dir}",
        f"data.seed={seed}", f"run.seed={seed}", f"prompt.init_seed={seed}", f"prompt.length={s.prompt_length}",
        f"data.max_source_length={s.max_source_length}", f"data.max_target_length={s.max_target_length}",
        f"data.max_train_samples={s.max_train_samples}", f"data.eval_mode={s.eval_mode}",
        *([f"data.split_overrides=[{','.join(overrides)}]"] if overrides else []),
        f"stage1.steps={s.stage1_steps}", f"stage1.lr={s.stage1_lr}", f"stage1.batch_size={s.stage1_batch}",
        "stage1.warmup_steps=10", f"stage1.eval_every={s.eval_every}",
        f"stage2.steps={s.stage2_steps}", f"stage2.batch_size={s.stage2_batch}", "stage2.warmup_steps=10",
        f"stage2.eval_every={s.stage2_eval_every or s.eval_every}", f"stage2.spot_lr={s.spot_lr}",
        "run.tracking=false", "run.progress=false",
    ]


def host_of(sources: tuple[str, ...]) -> str:
    for name in HOST_PREFERENCE:
        if name in sources:
            return name
    raise SystemExit(f"the sources need one of {HOST_PREFERENCE} to host their Stage-I process")


def train_sources(seed_dir: Path, args: list[str], sources: tuple[str, ...], s: Settings,
                  keep: Callable[[], None] = lambda: None) -> Path:
    """Stage I of every source, once per seed, on its full (capped) train set."""
    out = seed_dir / "sources"
    if not all_done([out / "stage1" / t for t in sources]):
        host = host_of(sources)
        others = [t for t in sources if t != host]
        train([*args, f"data.target={host}", f"data.sources=[{','.join(others)}]", "run.stages=stage1",
               f"data.max_eval_samples={s.source_eval_cap}", f"run.output_dir={out}"], seed_dir / "train.log")
        keep()
    return out / "stage1"


def link_sources(source_stage1: Path, stage1_dir: Path, sources: tuple[str, ...]) -> None:
    """Relative links, so the run folder can move as a whole."""
    stage1_dir.mkdir(parents=True, exist_ok=True)
    for task in sources:
        link = stage1_dir / task
        if not link.exists():
            link.symlink_to(os.path.relpath(source_stage1 / task, stage1_dir))


def run_target(seed_dir: Path, args: list[str], source_stage1: Path, target: str, k: int,
               sources: tuple[str, ...], variants: list[str], s: Settings, zero_shot: bool,
               keep: Callable[[], None] = lambda: None) -> None:
    base = seed_dir / f"{target}_k{k}"
    main = base / "main"
    log = base / "train.log"  # per target: two targets of a seed may run side by side
    target_args = [*args, f"data.target={target}", f"data.sources=[{','.join(sources)}]", f"data.k_shot={k}",
                   *([f"data.max_eval_samples={s.target_eval_cap}"] if s.target_eval_cap else [])]
    link_sources(source_stage1, main / "stage1", sources)
    wanted = [main / "stage1" / target, *(main / "stage2" / st for st in STRATEGIES)]
    if not all_done(wanted + ([main / "zero_shot"] if zero_shot else [])):
        train([*target_args, f"run.output_dir={main}", f"stage2.strategies=[{','.join(STRATEGIES)}]",
               f"run.zero_shot={str(zero_shot).lower()}"], log)
        keep()
    for name in variants:
        strategy, overrides = VARIANTS[name]
        if not all_done([base / name / "stage2" / strategy]):
            train([*target_args, *overrides, f"run.output_dir={base / name}", "run.stages=stage2",
                   f"run.stage1_dir={main / 'stage1'}", f"stage2.strategies=[{strategy}]"], log)
            keep()


def run_table(out: Path, data_dir: Path, s: Settings, args: argparse.Namespace, t0: float, backbone: str) -> None:
    """Every seed's sources, then every (seed, target, K), on ``args.jobs`` workers. A target waits
    for its seed's sources only, so the workers stay busy to the end (a pool over whole seeds
    left one core idle for the last seed's hours). No deadlock: every sources job is queued
    before any target job, so a target job only ever waits for one that is running or done."""
    sources = tuple(args.sources)
    common = {seed: base_args(backbone, data_dir, seed, s, sources) for seed in args.seeds}
    archiving = threading.Lock()  # two workers may finish processes of one seed at once

    def keeper(seed: int) -> Callable[[], None]:
        def keep() -> None:
            if args.archive:
                with archiving:
                    run_archive.archive(out / f"seed{seed}", Path(args.archive) / f"seed{seed}")
        return keep

    def seed_sources(seed: int) -> Path:
        stage1 = train_sources(out / f"seed{seed}", common[seed], sources, s, keeper(seed))
        print(f"seed {seed}: sources done at {time.time() - t0:.0f} s", flush=True)
        return stage1

    def target_runs(seed: int, target: str, k: int, source_stage1) -> None:
        run_target(out / f"seed{seed}", common[seed], source_stage1.result(), target, k, sources, args.variants, s,
                   zero_shot=s.zero_shot and seed == args.seeds[0], keep=keeper(seed))
        print(f"seed {seed}: {target} K={k} done at {time.time() - t0:.0f} s", flush=True)

    # A process finishes many runs (a seed's four sources are one ~1.5 CPU-hour process), so the
    # per-process keep() alone leaves finished runs on local disk for hours: archive on a timer too.
    stop = threading.Event()

    def archive_every(seconds: float) -> None:
        while not stop.wait(seconds):
            with archiving:
                run_archive.archive(out, Path(args.archive))

    timer = threading.Thread(target=archive_every, args=(args.archive_every,), daemon=True)
    if args.archive:
        timer.start()
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            stage1 = {seed: pool.submit(seed_sources, seed) for seed in args.seeds}
            jobs = [pool.submit(target_runs, seed, target, k, stage1[seed])
                    for seed in args.seeds for target in args.targets for k in args.k_shots]
            for future in [*stage1.values(), *jobs]:
                future.result()  # re-raises a failed job's SystemExit here
    finally:
        stop.set()


# ------------------------------------------------------------------------------ main

def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real_fewshot")
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"),
                        help="hub-schema JSONL folder, read in place (default: ../shared/data beside the repo)")
    parser.add_argument("--backbone", choices=("tiny_t5", "smollm2"), default="tiny_t5",
                        help="tiny_t5: pretrained here on the tasks' text; smollm2: SmolLM2-135M-Instruct (real)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", nargs="+", help="default: the backbone's settings' (rte cb mrpc / rotten_tomatoes cb mrpc)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--k_shots", type=int, nargs="+", help="default: the backbone's settings' (16 32 / 16)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="default: the backbone's settings'")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train.py processes side by side (a seed's sources, or one target of a seed); 1 while another job shares the cores")
    parser.add_argument("--archive", help="a folder that keeps the finished runs (to commit): restored into --out "
                        "before the table starts, updated after every process and every --archive_every seconds")
    parser.add_argument("--archive_every", type=float, default=300.0,
                        help="seconds between two copies of the finished runs into --archive while the table runs")
    parser.add_argument("--quick", action="store_true", help="tiny steps and backbone: a smoke test")
    parser.add_argument("--analyse_only", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    s = SMOLLM2 if args.backbone == "smollm2" else QUICK if args.quick else FULL
    if args.quick and args.backbone == "smollm2":
        s = replace(s, stage1_steps=4, stage2_steps=2, eval_every=4, stage2_eval_every=2, source_eval_cap=8,
                    target_eval_cap=8, max_train_samples=64)
    args.targets = args.targets or list(s.targets)
    args.k_shots = args.k_shots or list(s.k_shots)
    args.variants = list(s.variants) if args.variants is None else args.variants
    out, data_dir = Path(args.out).resolve(), Path(args.data_dir).resolve()
    sources = tuple(args.sources)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.archive:
        back = run_archive.restore(Path(args.archive), out)
        print(f"restored {len(back)} files of finished runs from {args.archive}", flush=True)
    if not args.analyse_only:
        import torch

        torch.set_num_threads(int(threads()))
        backbone = prepare_backbone(out, data_dir, s, t0)
        run_table(out, data_dir, s, args, t0, backbone)
    layout = analyse.Layout(out, args.seeds, args.targets, args.k_shots, sources, list(STRATEGIES),
                            {v: VARIANTS[v][0] for v in args.variants}, zero_shot=s.zero_shot)
    summary = analyse.summarise(layout, str(data_dir))
    summary["settings"] = asdict(s)
    previous = analyse.read_json(out / "summary.json") or {}
    # the wall time of the runs: an --analyse_only pass keeps the one the training pass measured
    summary["seconds"] = previous.get("seconds") if args.analyse_only else round(time.time() - t0, 1)
    summary["jobs"] = previous.get("jobs") if args.analyse_only else args.jobs
    command = "python benchmarks/real_fewshot/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.analyse_only and previous.get("command"):
        command = previous["command"]  # the report names the command that trained the runs
    summary["command"] = command
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = analyse.report(summary, command)
    (out / "report.md").write_text(text)
    if args.archive:
        run_archive.archive(out, Path(args.archive))  # the report too, and whatever a process left unkept
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
