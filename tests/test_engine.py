"""The engine's optimizer groups: fewer groups, the same updates."""

import torch

from dtvg_scale.runtime.engine import optimizer_groups


def test_parameters_with_one_learning_rate_share_a_group():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    (group,) = optimizer_groups([("prompt", a, 0.01), ("target_scale", b, 0.01), ("source_scales", c, 0.01)])
    assert group["params"] == [a, b, c] and group["lr"] == 0.01 and group["name"] == "prompt+target_scale+source_scales"
    first, second = optimizer_groups([("prompt", a, 0.3), ("target_scale", b, 0.01), ("source_scales", c, 0.3)])
    assert (first["params"], first["lr"], first["name"]) == ([a, c], 0.3, "prompt+source_scales")
    assert (second["params"], second["lr"]) == ([b], 0.01)


def test_merged_groups_take_the_same_adamw_steps_as_one_group_per_tensor():
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(4), torch.randn(2, 4)]
    targets = [torch.randn_like(t) for t in start]

    def train(merge: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        named = [(f"p{i}", p, 0.05) for i, p in enumerate(params)]
        groups = optimizer_groups(named) if merge else [{"params": [p], "lr": lr} for _, p, lr in named]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        for _ in range(5):
            optimizer.zero_grad()
            sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return [p.detach() for p in params]

    assert len(optimizer_groups([(f"p{i}", torch.nn.Parameter(t), 0.05) for i, t in enumerate(start)])) == 1
    for merged, separate in zip(train(True), train(False), strict=True):
        assert torch.equal(merged, separate)
