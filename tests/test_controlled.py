"""Controlled benchmark (benchmarks/controlled/run.py), small setting.

The world's invariants are checked directly; one end-to-end quick run (a tiny T5 pretrained
for ~20 s, Stage I on the 7 held-out tasks, Stage II with DTVG) checks what is true of the
grouping in that small setting (see docs/results.md: the group does not find the helpful
sources there, so the test does not claim it does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import golden
import pytest

from dtvg_scale.data import controlled, tasks
from dtvg_scale.recipes.config import DataArgs

ROOT = Path(__file__).resolve().parents[1]


def test_world_is_registered_and_planted():
    assert tasks.task_relation("ctl_help_a") == "helpful"
    assert tasks.task_relation("ctl_conf_b") == "conflicting"
    assert tasks.task_relation("emb_help_a") == "helpful"  # the embedded family still works
    tasks.check_tasks(list(controlled.CONTROLLED_TASKS))
    splits = tasks.load_task("ctl_target", DataArgs())
    assert len(splits.train) == controlled.TARGET_TRAIN  # the target is few-shot
    assert tasks.reported_metric("ctl_target") == "accuracy"
    for name in controlled.CONTROLLED_TASKS:
        s = controlled.controlled_task(name, n_train=64, n_validation=32, n_test=32)
        srcs = [e.source for e in (*s.train, *s.validation, *s.test)]
        assert len(set(srcs)) == len(srcs)  # disjoint splits
        assert sum(e.target == "1" for e in s.train) == len(s.train) // 2  # balanced
        d = controlled.WORLD.task(name)
        for e in s.train:
            assert (e.target == "1") == ((d.key in e.source.split()) == d.present)


def test_pretraining_mixture_covers_every_rule():
    rows = controlled.pretraining_examples(2000)
    assert {r.source.split()[0] for r in rows} == set(controlled.RULES)
    assert not any(r.source.split()[0].startswith("ctl_") for r in rows)  # tasks are held out


def test_quick_benchmark_dtvg_group(tmp_path):
    out = tmp_path / "ctl"
    cmd = [sys.executable, str(ROOT / "benchmarks/controlled/run.py"), "--out", str(out), "--quick", "--seeds", "0",
           "--strategies", "dtvg", "--variants", "dtvg_preset_centered", "dtvg_preset_transfer", "--no_wait"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backbone"]["heldout_accuracy"] >= 0.95  # the frozen backbone learned the family
    (seed0,) = summary["group"]["dtvg"]
    trace = seed0["trace"]
    assert len(trace) == 40 and all(0 <= row["size"] <= 6 for row in trace)
    # What is true in this small setting (docs/results.md): DTVG's group does NOT reliably find
    # the planted helpful sources here (every mean_dot similarity is close to every other: a
    # component all task vectors share dominates). What holds: the helpful sources are on
    # average more similar to the target than the conflicting ones, and the final group holds
    # no conflicting source.
    sims = seed0["sims"]
    assert sims["helpful"]["last"] > sims["conflicting"]["last"]
    assert not trace[-1]["conflicting_in"]
    # With stage2.preset=centered (centered_all similarity) the group at the end is exactly the
    # planted helpful pair, and no conflicting source is ever in it (also seed 1 here; over the
    # full setting's 10 runs only the second part holds: docs/results.md)
    (centered,) = summary["group"]["dtvg_preset_centered"]
    assert (centered["trace"][-1]["precision"], centered["trace"][-1]["recall"]) == (1.0, 1.0)
    assert not any(row["conflicting_in"] for row in centered["trace"])
    assert centered["sims"]["helpful"]["last"] > 0 > centered["sims"]["unrelated"]["last"]
    # With stage2.preset=transfer (sources ranked by their prompt's loss on the target's training
    # examples) the helpful pair ranks first and is in the group at every step, no conflicting
    # source ever is, and the group at the end is exactly the pair. (Exactly the pair at *every*
    # step holds on AMD EPYC and on an Intel Xeon at 2 threads; on that Xeon at 1 thread, the
    # suite's setting, an unrelated pair joined for steps 14-35: docs/results.md, "The test")
    (transfer,) = summary["group"]["dtvg_preset_transfer"]
    assert all(row["helpful_top"] and row["recall"] == 1.0 and not row["conflicting_in"] for row in transfer["trace"])
    assert (transfer["trace"][-1]["precision"], transfer["trace"][-1]["recall"]) == (1.0, 1.0)
    assert transfer["sims"]["helpful"]["last"] > transfer["sims"]["unrelated"]["last"] > transfer["sims"]["conflicting"]["last"]
    assert (out / "plots").is_dir() and any((out / "plots").glob("*.png"))
    # every score and every step's similarities and group of the three runs, as pinned (tests/golden)
    traces = {name: golden.read_jsonl(Path(run["dir"]) / "group_trace.jsonl")
              for name, (run,) in summary["group"].items()}
    golden.check({"scores": summary["scores"], "group_traces": traces}, "controlled_quick")


def test_llama_pretraining_format_is_the_pipelines(tmp_path):
    """The LLaMA backbone is pretrained on what PromptedModel later feeds a decoder-only model:
    bos, the source, then the target closed by eos, with loss on the target tokens only."""
    tok = controlled.build_tokenizer(tmp_path, "llama")
    rows = controlled.pretraining_examples(4)
    ids, mask, labels = controlled.encode(tok, rows, decoder_only=True)
    for row, r_ids, r_mask, r_labels in zip(rows, ids, mask, labels):
        n = int(r_mask.sum())
        assert tok.decode(r_ids[:n]) == f"<s> {row.source} {row.target} </s>"
        assert r_labels[r_mask.bool()].tolist() == [-100] * (n - 2) + [tok.convert_tokens_to_ids(row.target),
                                                                         tok.eos_token_id]
    model = controlled.make_model("llama", tok, controlled.PretrainConfig(d_model=32, d_ff=64))
    assert not model.config.is_encoder_decoder and model.config.vocab_size >= len(tok)


def test_the_controlled_backbone_is_pretrained_once_and_reused(tmp_path, monkeypatch):
    """``model.name_or_path=controlled:t5`` (the default): pretrained into the cache on first use
    (here with a few-step config: the real one's quality is docs/results.md's), complete or not
    there at all, and reused after that without pretraining again."""
    from dtvg_scale.runtime.backbone import BackboneError, is_decoder_only, resolve_model_path

    small = controlled.PretrainConfig(d_model=32, num_heads=4, d_ff=64, steps=3, batch_size=8, n_examples=64)
    monkeypatch.setitem(controlled.PRETRAINED, "t5", small)
    folder = Path(resolve_model_path("controlled:t5", tmp_path, 0, 0))
    stamp = json.loads((folder / controlled.STAMP).read_text())
    assert stamp["family"] == "t5" and stamp["config"]["steps"] == 3
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind

    def pretrain_again(*args, **kwargs):
        raise AssertionError("pretrained a second time")

    monkeypatch.setattr(controlled, "pretrain", pretrain_again)
    assert Path(resolve_model_path("controlled:t5", tmp_path, 0, 0)) == folder
    assert not is_decoder_only("controlled:t5") and is_decoder_only("controlled:llama")
    with pytest.raises(BackboneError, match="use controlled:t5 or controlled:llama"):
        resolve_model_path("controlled:gpt", tmp_path, 0, 0)
