"""The group trace's one schema (dtvg_scale/outputs/group_trace.py): rows made from decisions, read back
tolerantly, and the summaries every reader uses."""

import json

import pytest

from dtvg_scale.outputs import group_trace

NAMES = ("a", "b", "c")


def rows_of_three_steps():
    return group_trace.trace_rows(
        steps=[0, 1, 2], source_names=NAMES,
        mask=[[True, False, True], [True, False, True], [False, True, False]],
        target_sim=[[0.3, -0.1, 0.2], [0.3, -0.1, 0.25], [0.0, 0.4, -0.2]],
        kc=[[0.0, 0.5, 0.1], [0.0, 0.6, 0.1], [0.0, 0.2, 0.3]],
        candidates=[2, 2, 2], group_size=[2, 2, 1])


def test_rows_are_the_documented_schema_and_survive_a_half_written_file(tmp_path):
    rows = rows_of_three_steps()
    assert rows[0] == {"step": 0, "similarity": {"a": 0.3, "b": -0.1, "c": 0.2}, "kc": [0.0, 0.5, 0.1],
                       "candidates": 2, "group_size": 2, "group": ["a", "c"]}
    path = tmp_path / group_trace.FILE_NAME
    # step 1 written twice (a resumed run keeps its last row), then a line cut mid-write
    lines = [json.dumps(r) for r in (rows[1], rows[0], {**rows[1], "group": ["c"]}, rows[2])] + ['{"step": 3, "simil']
    path.write_text("\n".join(lines))
    read = group_trace.read_rows(path)
    assert [r["step"] for r in read] == [0, 1, 2] and read[1]["group"] == ["c"]
    assert group_trace.read_rows(tmp_path / "missing.jsonl") == []
    trace = group_trace.read_trace(path)
    assert trace.sources == list(NAMES) and trace.steps.tolist() == [0, 1, 2]
    assert trace.selected[:, 1].tolist() == [False, False, True] and trace.similarity[1, 2] == pytest.approx(0.4)


def test_summaries():
    rows = rows_of_three_steps()
    assert group_trace.run_lengths(rows) == [{"first_step": 0, "last_step": 1, "group": ["a", "c"]},
                                             {"first_step": 2, "last_step": 2, "group": ["b"]}]
    assert group_trace.selection_share(rows, NAMES) == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 2 / 3})
    assert group_trace.selection_share([], NAMES) == {}
    metrics = group_trace.step_metrics(rows[1])
    assert metrics["in_group/a"] == 1.0 and metrics["in_group/b"] == 0.0 and metrics["similarity/c"] == 0.25
    # TS: mean similarity of the group's members; KC: that of the ranked prefix of the group's size
    assert metrics["group/target_similarity"] == pytest.approx((0.3 + 0.25) / 2) and metrics["group/kc"] == 0.6
    assert group_trace.step_metrics({**rows[2], "group": [], "group_size": 0})["group/kc"] == 0.0


def test_the_recorder_turns_decisions_into_rows_and_names():
    """What the training loop is handed for a Stage-II run: decisions in, rows and names out."""
    import torch

    from dtvg_scale.method.prompts import DTVGPrompt
    from dtvg_scale.method.selection import group_scores

    target = torch.tensor([[1.0, 0.0]])
    sources = torch.tensor([[[1.0, 0.1]], [[-1.0, 0.0]], [[0.9, 0.2]]])
    decision = group_scores(target, sources)
    recorder = group_trace.GroupTraceRecorder(NAMES)
    (row,) = recorder.rows([7], [decision])
    assert row["step"] == 7 and row["group"] == recorder.at_best(decision) == ["a", "c"]
    assert row["candidates"] == 2 and list(row["similarity"]) == list(NAMES)
    assert torch.equal(recorder.agreement(decision), decision.mask)
    module = DTVGPrompt(torch.zeros(1, 2), target, sources)
    assert recorder.module_metrics(module) == pytest.approx(
        {"scale_norm/target": 1.0, "scale_norm/a": 1.0, "scale_norm/b": 1.0, "scale_norm/c": 1.0})


def test_a_checkpoint_keeps_the_best_prompts_group_and_reads_the_old_key():
    """The loop saves the recorder's entry generically (``at_best``); a checkpoint written before
    2026-12 named the group ``best_group``, and a run resumed from one still reports it."""
    from dtvg_scale.runtime.loop import saved_at_best

    recorder = group_trace.GroupTraceRecorder(NAMES)
    assert saved_at_best({"at_best": {"group_at_best": ["a"]}}, recorder) == {"group_at_best": ["a"]}
    assert saved_at_best({"best_group": ["a", "c"]}, recorder) == {"group_at_best": ["a", "c"]}
    assert saved_at_best({"best_group": None}, None) == {} == saved_at_best({}, recorder)  # Stage I
