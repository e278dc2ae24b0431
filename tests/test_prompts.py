"""The merge, the strategies and the prompt modules: gradients and decisions on crafted inputs."""

import pytest
import torch

from dtvg_scale.method.selection import group_scores
from dtvg_scale.method.merge import merge_prompt
from dtvg_scale.method.config import DTVGConfig
from dtvg_scale.method.prompts import DTVGPrompt, SoftPrompt, sample_init_prompt
from dtvg_scale.method.strategies import STRATEGIES, spot_source, strategy_mask


def _vectors(*rows):
    """Source task vectors [K, 1, d] whose token means are the given rows."""
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(1)


def test_merge_formula_and_gradients_reach_only_selected_scales():
    torch.manual_seed(0)
    r, d, k = 3, 5, 4
    init = torch.randn(r, d, dtype=torch.float64)
    target_tv = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    target_scale = torch.rand(r, dtype=torch.float64, requires_grad=True)
    source_tvs = torch.randn(k, r, d, dtype=torch.float64)
    source_scales = torch.rand(k, r, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, False])

    merged = merge_prompt(init, target_tv, target_scale, source_tvs, source_scales, mask)
    expected = init + target_scale[:, None] * target_tv
    for i in (0, 2):
        expected = expected + source_scales[i][:, None] * source_tvs[i]
    torch.testing.assert_close(merged, expected)

    merged.square().sum().backward()
    assert target_tv.grad.abs().sum() > 0 and target_scale.grad.abs().sum() > 0
    assert source_scales.grad[[0, 2]].abs().min() > 0
    assert torch.equal(source_scales.grad[[1, 3]], torch.zeros(2, r, dtype=torch.float64))


def test_dtvg_prompt_decision_is_not_differentiated_and_gradients_flow():
    torch.manual_seed(1)
    init = torch.randn(2, 4)
    target = init + torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    sources = torch.stack([torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([[-1.0, 0, 0, 0]] * 2)])
    module = DTVGPrompt(init, target, sources, DTVGConfig("dtvg"))
    merged, decision = module()
    assert decision.mask.tolist() == [True, False]
    assert not decision.target_sim.requires_grad
    merged.sum().backward()
    assert module.prompt.grad is not None and module.target_scale.grad.abs().sum() > 0
    assert module.source_scales.grad[0].abs().sum() > 0
    assert torch.equal(module.source_scales.grad[1], torch.zeros(2))
    # P_mix = P_init + T_t + T_0 at unit scales
    torch.testing.assert_close(merged.detach(), init + (target - init) + sources[0])


def test_dtvg_prompt_decides_on_scaled_vectors():
    init = torch.zeros(1, 2)
    target = torch.tensor([[1.0, 0.0]])
    sources = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.9, 0.1]])])
    module = DTVGPrompt(init, target, sources, DTVGConfig("dtvg", max_group_size=1))
    assert module()[1].mask.tolist() == [True, False]
    with torch.no_grad():
        module.source_scales[0].fill_(0.5)  # scaled, source 0 now ranks below source 1
    assert module()[1].mask.tolist() == [False, True]


def _decision(sims, pair_rows=None):
    sources = _vectors(*pair_rows) if pair_rows else _vectors(*[[s, 0.0] for s in sims])
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    return group_scores(target * 2, sources)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dtvg", [True, True, False, False]),
        ("positive_only", [True, True, True, False]),
        ("target_only", [False, False, False, False]),
        ("all_sources", [True, True, True, True]),
    ],
)
def test_strategy_masks(name, expected):
    # token means: s = (1, 0.8, 0, -1) * (2/2); KC: {0,1} 0.8*... positive, adding source 2 (zero vector) lowers it
    decision = _decision(None, pair_rows=[[1.0, 0.0], [0.8, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    mask, _, _ = strategy_mask(name, decision, 0.0, torch.zeros(4, dtype=torch.bool), torch.tensor(False))
    assert mask.tolist() == expected


def test_fixed_group_keeps_the_first_decision():
    init = torch.zeros(1, 2)
    target = torch.tensor([[1.0, 0.0]])
    sources = torch.stack([torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])])
    fixed = DTVGPrompt(init, target, sources, DTVGConfig("fixed_group"))
    dynamic = DTVGPrompt(init, target, sources, DTVGConfig("dtvg"))
    assert fixed()[1].mask.tolist() == [True, False]
    with torch.no_grad():  # the target turns around: DTVG follows, the fixed group does not
        for module in (fixed, dynamic):
            module.prompt.copy_(-target)
    assert dynamic()[1].mask.tolist() == [False, True]
    assert fixed()[1].mask.tolist() == [True, False]
    assert fixed.state_dict()["fixed_decided"].item() is True  # persisted: survives a resume


def test_dtvg_prompt_checkpoints_hold_only_trainable_state():
    module = DTVGPrompt(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(4, 2, 3))
    assert set(module.state_dict()) == {"prompt", "target_scale", "source_scales", "fixed_mask", "fixed_decided",
                                        "transfer_gain"}
    assert set(SoftPrompt(torch.zeros(2, 3)).state_dict()) == {"prompt"}


def test_dtvg_prompt_rejects_bad_shapes_and_strategies():
    with pytest.raises(ValueError, match="shape mismatch"):
        DTVGPrompt(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 2, 5))
    with pytest.raises(ValueError, match="strategy"):
        DTVGPrompt(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 2, 3), DTVGConfig("spot"))
    assert set(STRATEGIES) == {"dtvg", "positive_only", "target_only", "all_sources", "fixed_group", "spot"}


def test_spot_picks_the_most_cosine_similar_source_prompt():
    target = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # mean (1, 0.5)
    sources = torch.stack([
        torch.tensor([[10.0, -10.0], [10.0, -10.0]]),  # large but pointing away
        torch.tensor([[0.2, 0.1], [0.2, 0.1]]),  # small, same direction
        torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
    ])
    assert int(spot_source(target, sources)) == 1


def test_init_prompt_is_seeded_and_drawn_from_the_first_ids():
    table = torch.arange(20_000, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    a = sample_init_prompt(table, 100, vocab_limit=5000, seed=42)
    b = sample_init_prompt(table, 100, vocab_limit=5000, seed=42)
    c = sample_init_prompt(table, 100, vocab_limit=5000, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = a[:, 0].long()
    assert ids.max() < 5000 and len(set(ids.tolist())) == 100
    with pytest.raises(ValueError, match="exceeds"):
        sample_init_prompt(table[:50], 100)


def test_dtvg_prompt_uses_the_variant_knobs():
    init = torch.zeros(1, 2)
    target = torch.tensor([[1.0, 0.0]])
    # a component shared by every source dominates the raw similarity; centering removes it
    shared = torch.tensor([[0.0, 5.0]])
    sources = torch.stack([torch.tensor([[1.0, 0.0]]) + shared, torch.tensor([[-1.0, 0.0]]) + shared])
    raw = DTVGPrompt(init, target + shared, sources, DTVGConfig("positive_only"))
    centered = DTVGPrompt(init, target + shared, sources, DTVGConfig("positive_only", similarity="centered_all"))
    assert raw()[1].mask.tolist() == [True, True]
    assert centered()[1].mask.tolist() == [True, False]
    mean_merge = DTVGPrompt(init, target, sources, DTVGConfig("all_sources", merge="mean", scale_init="ones"))
    torch.testing.assert_close(mean_merge()[0], target + sources.mean(dim=0))
    zeros = DTVGPrompt(init, target, sources, DTVGConfig("all_sources", scale_init="zeros"))
    torch.testing.assert_close(zeros()[0], target)
    constant = DTVGPrompt(init, target, sources, DTVGConfig("all_sources", scale_init="constant", scale_value=0.25))
    torch.testing.assert_close(constant()[0], target + 0.25 * sources.sum(dim=0))
    with pytest.raises(ValueError, match="scale_init=constant needs scale_value"):
        DTVGConfig(scale_init="constant")
    with pytest.raises(ValueError, match="unknown similarity"):
        DTVGPrompt(init, target, sources, DTVGConfig(similarity="magic"))


def test_transfer_ranking_ranks_by_the_measured_gains_and_needs_them():
    # by task vectors source 0 is the most similar; the transfer gains rank 2, 1 first and put 0
    # below the threshold: the group is a prefix of the gains' ranking, KC from the vectors
    init = torch.zeros(2, 3)
    target = torch.ones(2, 3)
    sources = torch.stack([torch.ones(2, 3), 0.5 * torch.ones(2, 3), 0.4 * torch.ones(2, 3)])
    module = DTVGPrompt(init + 1, target, sources, DTVGConfig(ranking="transfer", threshold=0.0))
    # what the gains compare: P_init, then P_init + T_k for every source
    torch.testing.assert_close(module.transfer_prompts(), torch.cat([(init + 1).unsqueeze(0), init + 1 + sources]))
    with pytest.raises(RuntimeError, match="set_transfer_gain"):
        module()
    module.set_transfer_gain(torch.tensor([-0.5, 1.0, 2.0]))
    _, decision = module()
    assert decision.order.tolist() == [2, 1, 0]
    assert int(decision.num_candidates) == 2
    assert decision.mask.tolist() == [False, True, True]
    torch.testing.assert_close(decision.target_sim, torch.tensor([-0.5, 1.0, 2.0]))
    assert module.state_dict()["transfer_gain"].tolist() == [-0.5, 1.0, 2.0]  # a resumed run keeps them
    with pytest.raises(ValueError, match="transfer gain has shape"):
        module.set_transfer_gain(torch.zeros(2))
    with pytest.raises(ValueError, match="unknown ranking"):
        DTVGPrompt(init, target, sources, DTVGConfig(ranking="loss"))
