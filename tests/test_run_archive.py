"""Finished runs go into the archive and come back; running state and plots stay behind."""

from __future__ import annotations

import os
from pathlib import Path

from dtvg_scale.outputs.run_archive import archive, kept_files, restore


def write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_table(out: Path) -> None:
    """One seed as benchmarks/real_fewshot lays it out: the sources' process, and a target's
    process whose stage1/ links to the sources and whose Stage II is half done."""
    sources = out / "seed0" / "sources"
    write(sources / "config.yaml")
    write(sources / "init_prompt.safetensors", "p_init")
    write(sources / "stage1" / "sst2" / "result.json", "{}")
    write(sources / "stage1" / "sst2" / "best_prompt.safetensors", "vector")
    write(sources / "stage1" / "sst2" / "curve.png")
    write(sources / "stage1" / "sst2" / "checkpoints" / "step100" / "state.pt")
    main = out / "seed0" / "cb_k16" / "main"
    (main / "stage1").mkdir(parents=True)
    (main / "stage1" / "sst2").symlink_to(os.path.relpath(sources / "stage1" / "sst2", main / "stage1"))
    write(main / "stage1" / "cb" / "result.json", "{}")
    write(main / "stage2" / "dtvg" / "result.json", "{}")
    write(main / "stage2" / "dtvg" / "group_trace.jsonl", "{}\n")
    write(main / "stage2" / "spot" / "metrics.jsonl", "{}\n")  # running: no result.json yet
    write(main / "stage2" / "spot" / "checkpoints" / "step10" / "state.pt")
    write(main / "zero_shot" / "predictions.jsonl")  # died before its result
    write(out / "seed0" / "cb_k16" / "train.log", "log")


def test_archive_keeps_finished_runs_links_and_root_files_only(tmp_path):
    out, kept = tmp_path / "out", tmp_path / "archive"
    make_table(out)
    changed = archive(out, kept)
    assert sorted(map(str, changed)) == sorted(map(str, kept_files(kept))) == [
        "seed0/cb_k16/main/stage1/cb/result.json",
        "seed0/cb_k16/main/stage1/sst2",
        "seed0/cb_k16/main/stage2/dtvg/group_trace.jsonl",
        "seed0/cb_k16/main/stage2/dtvg/result.json",
        "seed0/cb_k16/train.log",
        "seed0/sources/config.yaml",
        "seed0/sources/init_prompt.safetensors",
        "seed0/sources/stage1/sst2/best_prompt.safetensors",
        "seed0/sources/stage1/sst2/result.json",
    ]
    link = kept / "seed0" / "cb_k16" / "main" / "stage1" / "sst2"
    assert link.is_symlink() and (link / "best_prompt.safetensors").read_text() == "vector"  # relative: still resolves
    assert archive(out, kept) == []  # nothing new: nothing copied


def test_restore_brings_finished_runs_into_a_new_folder_and_updates_changed_files(tmp_path):
    out, kept, fresh = tmp_path / "out", tmp_path / "archive", tmp_path / "fresh"
    make_table(out)
    archive(out, kept)
    restore(kept, fresh)
    assert (fresh / "seed0" / "cb_k16" / "main" / "stage1" / "sst2" / "result.json").is_file()
    assert not (fresh / "seed0" / "cb_k16" / "main" / "stage2" / "spot").exists()
    # the running SPoT finishes, and the log grows: the next archive takes both, nothing else
    write(out / "seed0" / "cb_k16" / "main" / "stage2" / "spot" / "result.json", "{}")
    write(out / "seed0" / "cb_k16" / "train.log", "log, longer")
    assert sorted(map(str, archive(out, kept))) == [
        "seed0/cb_k16/main/stage2/spot/metrics.jsonl",
        "seed0/cb_k16/main/stage2/spot/result.json",
        "seed0/cb_k16/train.log",
    ]
    assert (kept / "seed0" / "cb_k16" / "train.log").read_text() == "log, longer"
    assert restore(tmp_path / "missing", fresh) == []  # no archive yet: nothing to bring back
