"""The method's variants (dtvg_scale/method/): similarity, selection, merge and scale init.

Run: .venv/bin/python -m pytest -q tests/test_variants.py
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dtvg_scale.method import merge as merging
from dtvg_scale.method import selection, similarities
from dtvg_scale.method.config import VARIANT_DEFAULTS, VARIANT_KNOBS
from dtvg_scale.method.merge import init_scales, merge, merge_prompt
from dtvg_scale.method.selection import decide, group_objective, group_scores
from dtvg_scale.method.similarities import SIMILARITIES, center

F64 = torch.float64
COSINE_LIKE = ("mean_cosine", "flat_cosine", "token_cosine", "centered_sources", "centered_all")


def ranking(sim: torch.Tensor) -> list[int]:
    return torch.sort(sim, descending=True, stable=True).indices.tolist()


# --------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------
def test_registry_and_knobs():
    assert tuple(SIMILARITIES) == VARIANT_KNOBS["similarity"]
    assert set(SIMILARITIES) == {
        "mean_dot",
        "mean_cosine",
        "flat_dot",
        "flat_cosine",
        "centered_sources",
        "centered_all",
        "token_cosine",
    }
    assert set(VARIANT_KNOBS) == {"similarity", "selection", "merge", "scale_init", "ranking"}
    assert VARIANT_DEFAULTS == {
        "similarity": "mean_dot",
        "selection": "greedy_prefix",
        "merge": "sum",
        "scale_init": "ones",
        "ranking": "task_vector",
    }


def test_mean_dot_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    for r, d, K in [(1, 3, 1), (4, 16, 7), (8, 5, 3)]:
        t = torch.randn(r, d, generator=g, dtype=F64)
        s = torch.randn(K, r, d, generator=g, dtype=F64)
        target_sim, pair_sim = similarities.mean_dot(t, s)
        torch.testing.assert_close(target_sim, (t.mean(dim=0) * s.mean(dim=1)).mean(dim=-1))
        torch.testing.assert_close(pair_sim, (s.mean(dim=1)[:, None] * s.mean(dim=1)[None]).mean(dim=-1))


def test_similarity_formulas_against_direct_definitions():
    g = torch.Generator().manual_seed(1)
    r, d, K = 3, 6, 4
    t = torch.randn(r, d, generator=g, dtype=F64)
    s = torch.randn(K, r, d, generator=g, dtype=F64)
    cos = torch.nn.functional.cosine_similarity

    def direct(name, a, b):
        if name == "mean_cosine":
            return cos(a.mean(0), b.mean(0), dim=0)
        if name == "flat_dot":
            return (a * b).sum() / a.numel()
        if name == "flat_cosine":
            return cos(a.flatten(), b.flatten(), dim=0)
        if name == "token_cosine":
            return cos(a, b, dim=-1).mean()
        raise AssertionError(name)

    for name in ("mean_cosine", "flat_dot", "flat_cosine", "token_cosine"):
        target_sim, pair_sim = SIMILARITIES[name](t, s)
        torch.testing.assert_close(target_sim, torch.stack([direct(name, t, s[k]) for k in range(K)]))
        expected = torch.stack([torch.stack([direct(name, s[i], s[j]) for j in range(K)]) for i in range(K)])
        torch.testing.assert_close(pair_sim, expected)

    for name, include in (("centered_sources", False), ("centered_all", True)):
        mu = s.mean(0) if not include else torch.cat([s, t[None]]).mean(0)
        target_sim, pair_sim = SIMILARITIES[name](t, s)
        torch.testing.assert_close(
            target_sim, torch.stack([cos((t - mu).mean(0), (s[k] - mu).mean(0), dim=0) for k in range(K)])
        )
        torch.testing.assert_close(pair_sim, similarities.mean_cosine(s[0] - mu, s - mu)[1])


def test_center_is_a_separate_step():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 5, generator=g, dtype=F64)
    s = torch.randn(4, 3, 5, generator=g, dtype=F64)
    ct, cs = center(t, s, include_target=False)
    torch.testing.assert_close(cs.mean(0), torch.zeros(3, 5, dtype=F64))
    torch.testing.assert_close(ct, t - s.mean(0))
    ct, cs = center(t, s, include_target=True)
    torch.testing.assert_close((cs.sum(0) + ct) / 5, torch.zeros(3, 5, dtype=F64))
    torch.testing.assert_close(ct, t - (s.sum(0) + t) / 5)
    # no source: mu = 0 without the target, mu = target with it; never NaN
    ct, cs = center(t, s[:0], include_target=False)
    assert torch.equal(ct, t) and cs.shape == (0, 3, 5)
    ct, _ = center(t, s[:0], include_target=True)
    assert torch.equal(ct, torch.zeros_like(t))


def test_shared_component_changes_raw_ranking_but_not_centered():
    # d = 3, r = 2 (identical rows, so token means are the rows). Without the shared
    # component, source 0 is the target's direction; a large component c along axis 2 added
    # to the target AND every source makes source 1 (which already points along c) win.
    t = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, -0.5]], dtype=F64)
    c = torch.tensor([0.0, 0.0, 5.0], dtype=F64)
    rows = lambda v: v.unsqueeze(-2).expand(*v.shape[:-1], 2, 3).clone()

    raw, _ = similarities.mean_dot(rows(t), rows(s))
    raw_shared, _ = similarities.mean_dot(rows(t + c), rows(s + c))
    assert ranking(raw)[0] == 0
    assert ranking(raw_shared)[0] == 1
    assert ranking(raw) != ranking(raw_shared)

    for name in ("centered_sources", "centered_all"):
        fn = SIMILARITIES[name]
        plain, plain_pairs = fn(rows(t), rows(s))
        shared, shared_pairs = fn(rows(t + c), rows(s + c))
        assert ranking(plain) == ranking(shared)
        assert ranking(plain)[0] == 0
        torch.testing.assert_close(plain, shared)
        torch.testing.assert_close(plain_pairs, shared_pairs)


def test_shared_component_random_invariance_of_centering():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 8, generator=g, dtype=F64)
    s = torch.randn(6, 4, 8, generator=g, dtype=F64)
    c = 10 * torch.randn(4, 8, generator=g, dtype=F64)
    for include in (False, True):
        ct, cs = center(t, s, include)
        ct2, cs2 = center(t + c, s + c, include)
        torch.testing.assert_close(ct, ct2)
        torch.testing.assert_close(cs, cs2)


@pytest.mark.parametrize("name", COSINE_LIKE)
def test_negated_target_ranks_last(name):
    # The other sources come in +/- pairs, so the library is balanced: centering then keeps
    # the negated target exactly opposite to the target (with an unbalanced library a
    # centered negation need not be last, since t - mu and -t - mu are not opposite).
    g = torch.Generator().manual_seed(4)
    r, d = 4, 8
    t = torch.randn(r, d, generator=g, dtype=F64)
    others = torch.randn(3, r, d, generator=g, dtype=F64)
    s = torch.cat([others, -t[None], -others])
    target_sim, _ = SIMILARITIES[name](t, s)
    assert ranking(target_sim)[-1] == 3
    assert target_sim[3] < target_sim[torch.arange(7) != 3].min()
    if name != "centered_sources":  # centered_all: mu = 0 here; the rest are plain cosines
        torch.testing.assert_close(target_sim[3], torch.tensor(-1.0, dtype=F64))


@pytest.mark.parametrize("name", ["mean_cosine", "flat_cosine", "token_cosine"])
def test_negated_target_ranks_last_random_library(name):
    # Uncentered cosines: the negation is last for any library (centering needs a balanced
    # library, see test_negated_target_ranks_last).
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, 6, generator=g, dtype=F64) + 2.0
    s = torch.cat([torch.randn(5, 3, 6, generator=g, dtype=F64) + 2.0, -t[None]])
    target_sim, _ = SIMILARITIES[name](t, s)
    assert ranking(target_sim)[-1] == 5


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_zero_vectors_give_no_nan(name):
    r, d = 3, 4
    g = torch.Generator().manual_seed(6)
    s = torch.cat([torch.zeros(2, r, d), torch.randn(2, r, d, generator=g)])
    for t in (torch.zeros(r, d), torch.randn(r, d, generator=g)):
        for sources in (s, torch.zeros(3, r, d)):
            target_sim, pair_sim = SIMILARITIES[name](t, sources)
            assert torch.isfinite(target_sim).all() and torch.isfinite(pair_sim).all()
            for rule in selection.SELECTIONS:
                dec = decide(t, sources, name, rule, top_k=2)
                assert dec.mask.dtype == torch.bool
                assert torch.isfinite(dec.target_sim).all() and torch.isfinite(dec.kc).all()
    if name not in ("mean_dot", "flat_dot"):
        target_sim, pair_sim = SIMILARITIES[name](torch.zeros(r, d), torch.zeros(2, r, d))
        assert torch.equal(target_sim, torch.zeros(2)) and torch.equal(pair_sim, torch.zeros(2, 2))


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_bf16_inputs(name):
    g = torch.Generator().manual_seed(7)
    t = torch.randn(4, 16, generator=g).bfloat16()
    s = torch.randn(5, 4, 16, generator=g).bfloat16()
    target_sim, pair_sim = SIMILARITIES[name](t, s)
    assert target_sim.dtype == torch.float32 and pair_sim.shape == (5, 5)
    assert torch.isfinite(target_sim).all() and torch.isfinite(pair_sim).all()
    for rule in selection.SELECTIONS:
        dec = decide(t, s, name, rule, top_k=2)
        assert dec.mask.dtype == torch.bool and dec.mask.shape == (5,)
        assert dec.group_size == dec.mask.sum()


# --------------------------------------------------------------------------------------------
# selection: greedy_prefix == selection.group_scores
# --------------------------------------------------------------------------------------------
def _random_case(g, K, r, d, ties):
    t = torch.randn(r, d, generator=g, dtype=F64)
    s = torch.randn(K, r, d, generator=g, dtype=F64)
    if ties and K >= 2:  # duplicated sources: tied similarities, tied KC
        s[K // 2 :] = s[: K - K // 2].clone()
    return t, s


def _assert_same_decision(a, b):
    assert a._fields == b._fields
    for field, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype, field
        assert torch.equal(x, y), field


def test_greedy_prefix_mean_dot_equals_group_scores():
    g = torch.Generator().manual_seed(8)
    count = 0
    for K, ties in itertools.product([0, 1, 2, 3, 5, 8, 12], [False, True]):
        for r, d in [(1, 3), (4, 8)]:
            for _ in range(2):
                t, s = _random_case(g, K, r, d, ties)
                for kw in (
                    {},
                    {"threshold": -0.05},
                    {"threshold": 0.02},
                    {"kc_weight": 0.5},
                    {"kc_weight": 2.0, "max_group_size": 2},
                    {"max_group_size": 1},
                    {"threshold": -1e9, "kc_weight": 0.0},
                ):
                    _assert_same_decision(decide(t, s, "mean_dot", "greedy_prefix", **kw), group_scores(t, s, **kw))
                    count += 1
    assert count > 350
    # default arguments are the paper's
    t, s = _random_case(g, 6, 4, 8, False)
    _assert_same_decision(decide(t, s), group_scores(t, s))
    # float32 too
    _assert_same_decision(decide(t.float(), s.float()), group_scores(t.float(), s.float()))


def test_greedy_prefix_uses_the_chosen_similarity():
    g = torch.Generator().manual_seed(9)
    t, s = _random_case(g, 7, 4, 8, False)
    for name, fn in SIMILARITIES.items():
        target_sim, pair_sim = fn(t, s)
        dec = decide(t, s, name, "greedy_prefix", kc_weight=0.3)
        assert torch.equal(dec.target_sim, target_sim)
        # the prefix logic sees exactly these similarities
        _assert_same_decision(dec, selection.prefix_decision(target_sim, pair_sim, 0.0, 0.3, None))


# --------------------------------------------------------------------------------------------
# selection: exact
# --------------------------------------------------------------------------------------------
def _greedy_suboptimal_case():
    """r = 1, d = 3. Source 0 is the most target-similar but conflicts with 1 and 2, which
    agree strongly with each other: every ranked prefix containing 0 and another source has a
    very negative KC, so the prefix rule keeps {0}; {1, 2} is far better for TS + KC."""
    t = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    s = torch.tensor([[[1.0, 3.0, 0.0]], [[0.9, -3.0, 2.0]], [[0.8, -3.0, 2.0]]], dtype=F64)
    return t, s


@pytest.mark.parametrize("kc_weight", [None, 1.0, 0.5])
def test_exact_beats_greedy_on_crafted_case(kc_weight):
    t, s = _greedy_suboptimal_case()
    lam = 1.0 if kc_weight is None else kc_weight
    greedy = decide(t, s, "mean_dot", "greedy_prefix", kc_weight=lam)
    exact = decide(t, s, "mean_dot", "exact", kc_weight=kc_weight)
    assert greedy.mask.tolist() == [True, False, False]
    assert exact.mask.tolist() == [False, True, True] and exact.group_size == 2
    _, pair_sim = similarities.mean_dot(t, s)
    obj_greedy = group_objective(greedy.mask, greedy.target_sim, pair_sim, lam)
    obj_exact = group_objective(exact.mask, exact.target_sim, pair_sim, lam)
    assert obj_exact > obj_greedy + 1.0
    # hand values: sims / d with d = 3
    torch.testing.assert_close(obj_greedy, torch.tensor(1.0 / 3, dtype=F64))
    expected = (0.9 + 0.8) / 2 / 3 + lam * (0.72 + 9.0 + 4.0) / 3
    torch.testing.assert_close(obj_exact, torch.tensor(expected, dtype=F64))


def _brute_force_exact(target_sim, pair_sim, threshold, lam, cap):
    """Plain-Python maximiser over subsets of candidates in the documented tie order."""
    sims = target_sim.tolist()
    P = pair_sim.tolist()
    order = sorted(range(len(sims)), key=lambda k: sims[k], reverse=True)
    cands = [k for k in order if sims[k] >= threshold]
    best, best_obj = [], -math.inf
    for m in range(1, len(cands) + 1):
        if cap is not None and m > cap:
            break
        for idx in itertools.combinations(range(len(cands)), m):  # lexicographic by rank
            group = [cands[i] for i in idx]
            ts = sum(sims[k] for k in group) / m
            kc = 0.0 if m == 1 else sum(P[i][j] for i in group for j in group if i != j) / (m * (m - 1))
            if ts + lam * kc > best_obj:
                best, best_obj = group, ts + lam * kc
    return best, best_obj


def test_exact_matches_brute_force_and_dominates_greedy():
    g = torch.Generator().manual_seed(10)
    for K in range(11):
        for trial in range(3):
            t, s = _random_case(g, K, 2, 4, ties=False)
            if trial % 2:  # a shared direction, so KC matters
                s = s + torch.randn(1, 2, 4, generator=g, dtype=F64)
            for name, threshold, lam, cap in [
                ("mean_dot", 0.0, 1.0, None),
                ("mean_cosine", -0.2, 0.5, 3),
                ("flat_cosine", 0.0, 3.0, None),
                ("centered_all", -1.0, 0.2, 2),
            ]:
                target_sim, pair_sim = SIMILARITIES[name](t, s)
                exact = decide(t, s, name, "exact", threshold=threshold, kc_weight=lam, max_group_size=cap)
                greedy = decide(t, s, name, "greedy_prefix", threshold=threshold, kc_weight=lam, max_group_size=cap)
                obj_exact = group_objective(exact.mask, target_sim, pair_sim, lam)
                obj_greedy = group_objective(greedy.mask, target_sim, pair_sim, lam)
                assert obj_exact >= obj_greedy - 1e-12
                group, ref_obj = _brute_force_exact(target_sim, pair_sim, threshold, lam, cap)
                assert sorted(group) == exact.mask.nonzero().flatten().tolist()
                assert exact.group_size == len(group)
                if group:
                    assert abs(obj_exact.item() - ref_obj) < 1e-12
                    assert bool((target_sim[exact.mask] >= threshold).all())
                else:
                    assert not bool((target_sim >= threshold).any())


def test_exact_tie_break_smallest_then_best_ranked():
    # Orthogonal sources with equal target similarity: every group has TS = 0.25, KC = 0.
    t = torch.ones(1, 4, dtype=F64)
    s = torch.eye(4, dtype=F64).unsqueeze(1)
    dec = decide(t, s, "mean_dot", "exact", kc_weight=1.0)
    assert dec.mask.tolist() == [True, False, False, False]
    # same, with source 2 ranked first: the tie goes to the best-ranked source
    s2 = s.clone()
    s2[2, 0, 2] = 1.5
    dec = decide(t, s2, "mean_dot", "exact", kc_weight=0.0)
    assert dec.mask.tolist() == [False, False, True, False]


def test_exact_subset_table_order():
    table = selection._subset_table(3, torch.device("cpu")).int().tolist()
    assert table == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert selection._subset_table(16, torch.device("cpu")).shape == (2**16 - 1, 16)


def test_exact_limits():
    g = torch.Generator().manual_seed(11)
    t = torch.randn(2, 4, generator=g)
    with pytest.raises(ValueError):
        decide(t, torch.randn(17, 2, 4, generator=g), selection="exact")
    dec = decide(t, torch.randn(16, 2, 4, generator=g), selection="exact", max_group_size=3)
    assert dec.mask.shape == (16,) and dec.group_size <= 3
    assert decide(t, torch.randn(0, 2, 4), selection="exact").mask.shape == (0,)
    # no candidate -> empty group
    assert not decide(t, torch.randn(4, 2, 4, generator=g), selection="exact", threshold=1e9).mask.any()


# --------------------------------------------------------------------------------------------
# selection: top_k
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mean_dot", "mean_cosine", "token_cosine"])
def test_top_k(name):
    g = torch.Generator().manual_seed(12)
    t = torch.randn(3, 6, generator=g, dtype=F64)
    s = torch.randn(9, 3, 6, generator=g, dtype=F64)
    target_sim, _ = SIMILARITIES[name](t, s)
    for k in (1, 3, 9, 20):
        dec = decide(t, s, name, "top_k", threshold=-1e9, top_k=k)
        expected = set(torch.topk(target_sim, min(k, 9)).indices.tolist())
        assert set(dec.mask.nonzero().flatten().tolist()) == expected
        assert dec.group_size == len(expected)
    # threshold: only candidates, even when k is larger
    threshold = target_sim.sort(descending=True).values[1].item()  # exactly two candidates
    dec = decide(t, s, name, "top_k", threshold=threshold, top_k=5)
    assert set(dec.mask.nonzero().flatten().tolist()) == set(torch.topk(target_sim, 2).indices.tolist())
    assert dec.num_candidates == 2
    assert not decide(t, s, name, "top_k", threshold=1e9, top_k=3).mask.any()
    # cap
    assert decide(t, s, name, "top_k", threshold=-1e9, top_k=5, max_group_size=2).group_size == 2


def test_top_k_ties_keep_source_order():
    t = torch.ones(1, 2, dtype=F64)
    s = torch.ones(4, 1, 2, dtype=F64)
    assert decide(t, s, selection="top_k", top_k=2).mask.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "kw",
    [
        {"similarity": "nope"},
        {"selection": "nope"},
        {"selection": "top_k"},
        {"selection": "top_k", "top_k": 0},
        {"max_group_size": 0},
    ],
)
def test_decide_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        decide(torch.randn(2, 3), torch.randn(4, 2, 3), **kw)


def test_decide_shape_mismatch_raises():
    with pytest.raises(ValueError):
        decide(torch.randn(2, 3), torch.randn(4, 2, 4), similarity="token_cosine")


def test_no_host_sync_in_decide_and_merge(monkeypatch):
    g = torch.Generator().manual_seed(13)
    t = torch.randn(3, 5, generator=g)
    s = torch.randn(6, 3, 5, generator=g)
    init = torch.randn(3, 5, generator=g)
    a_t, a_k = init_scales(6, 3)
    cases = [(name, sel) for name in SIMILARITIES for sel in selection.SELECTIONS]
    selection._subset_table(6, t.device)  # the table is built once, outside the guard

    def run():
        out = []
        for name, sel in cases:
            dec = decide(t, s, name, sel, kc_weight=0.5, max_group_size=4, top_k=2)
            out.append(dec.mask)
            for mode in merging.MERGES:
                out.append(merge(init, t, a_t, s, a_k, dec.mask, mode, dec.target_sim, 0.5))
        return out

    expected = run()

    def forbid(name):
        def _raise(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called (host sync)")

        return _raise

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    got = run()
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_exact_at_k16_and_greedy_at_k_hundreds():
    """The limits the docs promise work (how fast: benchmarks/grouping_select.py, not a test)."""
    g = torch.Generator().manual_seed(14)
    t = torch.randn(8, 32, generator=g)
    sixteen = torch.randn(16, 8, 32, generator=g)
    exact = decide(t, sixteen, selection="exact", kc_weight=1.0)
    greedy = decide(t, sixteen, kc_weight=1.0)
    assert exact.mask.shape == (16,) and exact.mask.any()
    target_sim, pair_sim = SIMILARITIES["mean_dot"](t, sixteen)
    assert group_objective(exact.mask, target_sim, pair_sim, 1.0) >= group_objective(greedy.mask, target_sim, pair_sim, 1.0)
    for name in SIMILARITIES:
        many = decide(t, torch.randn(300, 8, 32, generator=g), similarity=name)
        assert many.mask.shape == (300,) and many.target_sim.isfinite().all()


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------
def _merge_case(dtype=F64):
    init = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    a_t = torch.tensor([2.0, 3.0], dtype=dtype)
    sources = torch.tensor(
        [[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]], [[100.0, 100.0], [100.0, 100.0]]], dtype=dtype
    )
    a_k = torch.tensor([[1.0, 2.0], [3.0, 1.0], [5.0, 5.0]], dtype=dtype)
    mask = torch.tensor([True, True, False])
    return init, target, a_t, sources, a_k, mask


def test_merge_sum_is_merge_prompt():
    g = torch.Generator().manual_seed(15)
    init, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    s, a_k = torch.randn(5, 4, 6, generator=g), torch.rand(5, 4, generator=g)
    a_t = torch.rand(4, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    assert torch.equal(merge(init, t, a_t, s, a_k, mask), merge_prompt(init, t, a_t, s, a_k, mask))
    assert torch.equal(merge(init, t, a_t, s, a_k, mask, "sum"), merge_prompt(init, t, a_t, s, a_k, mask))


def test_merge_mean_and_softmax_hand_computed():
    init, t, a_t, s, a_k, mask = _merge_case()
    base = torch.tensor([[1 + 2, 2 + 0], [3 + 0, 4 + 3]], dtype=F64)  # P_init + a_t * T_t
    u0 = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=F64)  # a_0 * T_0
    u1 = torch.tensor([[6.0, 0.0], [0.0, 2.0]], dtype=F64)  # a_1 * T_1
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, mask, "sum"), base + u0 + u1)
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, mask, "mean"), base + (u0 + u1) / 2)
    # softmax over the selected: sims [0, log 3] -> weights [1/4, 3/4]; source 2 (sim 50,
    # unselected) gets weight 0
    sims = torch.tensor([0.0, math.log(3.0), 50.0], dtype=F64)
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, mask, "softmax", sims), base + 0.25 * u0 + 0.75 * u1)
    torch.testing.assert_close(
        merge(init, t, a_t, s, a_k, mask, "softmax", 2 * sims, temperature=2.0), base + 0.25 * u0 + 0.75 * u1
    )
    # one selected: weight 1
    one = torch.tensor([False, True, False])
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, one, "softmax", sims), base + u1)
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, one, "mean"), base + u1)


@pytest.mark.parametrize("mode", ["sum", "mean", "softmax"])
def test_merge_none_selected_is_target_only(mode):
    init, t, a_t, s, a_k, _ = _merge_case()
    none = torch.zeros(3, dtype=torch.bool)
    sims = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    out = merge(init, t, a_t, s, a_k, none, mode, sims)
    assert torch.equal(out, init + a_t.unsqueeze(-1) * t)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["sum", "mean", "softmax"])
def test_merge_gradients(mode):
    init, t, a_t, s, a_k, mask = _merge_case()
    t = t.clone().requires_grad_(True)
    a_t = a_t.clone().requires_grad_(True)
    a_k = a_k.clone().requires_grad_(True)
    sims = torch.tensor([0.5, 1.0, 900.0], dtype=F64, requires_grad=True)
    out = merge(init, t, a_t, s, a_k, mask, mode, sims, temperature=0.7)
    (out * torch.arange(1.0, 5.0, dtype=F64).view(2, 2)).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert a_t.grad is not None and a_t.grad.abs().sum() > 0
    assert torch.equal(a_k.grad[2], torch.zeros(2, dtype=F64))  # unselected: exactly zero
    assert (a_k.grad[:2].abs().sum(-1) > 0).all()
    assert sims.grad is None  # weights are constants
    # gradient of a selected scale = weight * <T_k row, upstream row>
    upstream = torch.arange(1.0, 5.0, dtype=F64).view(2, 2)
    weights = {
        "sum": [1.0, 1.0],
        "mean": [0.5, 0.5],
        "softmax": torch.softmax(torch.tensor([0.5, 1.0]) / 0.7, 0).tolist(),
    }[mode]
    for k in range(2):
        torch.testing.assert_close(a_k.grad[k], weights[k] * (s[k] * upstream).sum(-1))


def test_merge_rejects_bad_arguments():
    init, t, a_t, s, a_k, mask = _merge_case()
    with pytest.raises(ValueError):
        merge(init, t, a_t, s, a_k, mask, "nope")
    with pytest.raises(ValueError):
        merge(init, t, a_t, s, a_k, mask, "softmax")
    with pytest.raises(ValueError):
        merge(init, t, a_t, s, a_k, mask, "softmax", torch.zeros(3), temperature=0.0)


@pytest.mark.parametrize("mode", ["sum", "mean", "softmax"])
def test_merge_bf16(mode):
    init, t, a_t, s, a_k, mask = _merge_case(torch.bfloat16)
    sims = torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16)
    out = merge(init, t, a_t, s, a_k, mask, mode, sims)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = merge(
        *(x.double() if x.is_floating_point() else x for x in (init, t, a_t, s, a_k, mask)), mode, sims.double()
    )
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=5e-2)


def test_merge_zero_sources():
    init, t, a_t = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2)
    for mode in merging.MERGES:
        out = merge(
            init,
            t,
            a_t,
            torch.empty(0, 2, 3),
            torch.empty(0, 2),
            torch.empty(0, dtype=torch.bool),
            mode,
            torch.empty(0),
        )
        torch.testing.assert_close(out, init + t)


# --------------------------------------------------------------------------------------------
# scale init
# --------------------------------------------------------------------------------------------
def test_init_scales():
    a_t, a_k = init_scales(4, 3)
    assert torch.equal(a_t, torch.ones(3)) and torch.equal(a_k, torch.ones(4, 3)) and a_k.dtype == torch.float32
    a_t, a_k = init_scales(4, 3, "uniform", dtype=F64)
    assert torch.equal(a_t, torch.ones(3, dtype=F64)) and torch.equal(a_k, torch.full((4, 3), 0.25, dtype=F64))
    a_t, a_k = init_scales(4, 3, "zeros")
    assert torch.equal(a_t, torch.ones(3)) and torch.equal(a_k, torch.zeros(4, 3))
    a_t, a_k = init_scales(4, 3, "constant", value=0.3, dtype=torch.bfloat16)
    assert a_k.dtype == torch.bfloat16 and torch.equal(a_k, torch.full((4, 3), 0.3, dtype=torch.bfloat16))
    assert init_scales(0, 3, "uniform")[1].shape == (0, 3)
    assert tuple(merging.SCALE_INITS) == VARIANT_KNOBS["scale_init"]
    for bad in ({"mode": "nope"}, {"mode": "constant"}, {"mode": "ones", "value": 2.0}):
        with pytest.raises(ValueError):
            init_scales(2, 3, **bad)


def test_uniform_init_sum_of_all_is_mean():
    g = torch.Generator().manual_seed(16)
    init, t, s = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    a_t, a_k = init_scales(4, 2, "uniform")
    everything = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, everything, "sum"), init + t + s.mean(0))
    a_t, a_k = init_scales(4, 2, "ones")
    torch.testing.assert_close(merge(init, t, a_t, s, a_k, everything, "mean"), init + t + s.mean(0))


def test_given_target_sim_ranks_and_thresholds_while_kc_compares_vectors():
    # sources 0 and 1 point the same way, 2 the other way; by mean_dot the target (+1) ranks
    # 0, 1 first. Given scores rank 2 first and leave 1 below the threshold: candidates are
    # [2, 0], and KC of {2, 0} (opposite vectors) is negative, so the group is {2} alone.
    target = torch.ones(1, 2)
    sources = torch.stack([torch.ones(1, 2), torch.ones(1, 2), -torch.ones(1, 2)])
    given = torch.tensor([0.5, -0.1, 0.9])
    decision = decide(target, sources, target_sim=given, threshold=0.0)
    assert decision.order.tolist() == [2, 0, 1]
    assert int(decision.num_candidates) == 2 and decision.mask.tolist() == [False, False, True]
    torch.testing.assert_close(decision.target_sim, given)
    assert float(decision.kc[1]) < 0  # KC still from the task vectors
    plain = decide(target, sources, threshold=0.0)
    assert plain.order.tolist()[:2] == [0, 1] and plain.mask.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="target_sim has shape"):
        decide(target, sources, target_sim=torch.zeros(2))


@pytest.mark.parametrize("name", similarities.POOLED_SIMILARITIES)
def test_pooled_similarities_decide_the_same_on_scaled_token_means(name):
    # what DTVGPrompt feeds them instead of the [K, r, d] scaled vectors
    g = torch.Generator().manual_seed(3)
    target, sources = torch.randn(5, 7, generator=g), torch.randn(9, 5, 7, generator=g)
    target_scale, source_scales = torch.rand(5, generator=g), torch.rand(9, 5, generator=g)
    full = decide(target_scale[:, None] * target, source_scales[..., None] * sources, name)
    pooled = decide(similarities.scaled_token_means(target_scale, target),
                    similarities.scaled_token_means(source_scales, sources), name)
    assert torch.equal(full.mask, pooled.mask) and torch.equal(full.order, pooled.order)
    torch.testing.assert_close(full.target_sim, pooled.target_sim)
    torch.testing.assert_close(full.kc, pooled.kc)
    assert name not in ("flat_dot", "flat_cosine", "token_cosine")
