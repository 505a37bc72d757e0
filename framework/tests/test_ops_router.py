"""Operators against their references, and router behaviour (selection, weights, balance losses, bias)."""

import pytest
import torch

from pithtrain.models.blocks import GroupedExperts, MoE, Router, RouterConfig
from pithtrain.ops.grouped_mm import grouped_mm, grouped_mm_reference
from pithtrain.ops.permute import permute, unpermute, unpermute_reference


def test_permute_unpermute_roundtrip_skewed():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    ids = torch.zeros(10, 2, dtype=torch.long)  # everything to expert 0 and 3; experts 1, 2 empty
    ids[:, 1] = 3
    xs, order, counts = permute(x, ids, num_experts=4)
    assert counts.tolist() == [10, 0, 0, 10]
    assert torch.equal(xs[:10], x) and torch.equal(xs[10:], x)  # stable: token order kept per expert
    w = torch.rand(10, 2)
    assert torch.allclose(unpermute(xs, order, w), unpermute_reference(xs, order, w))
    assert torch.allclose(unpermute(xs, order, w), x * w.sum(1, keepdim=True))


def test_grouped_mm_matches_per_expert_matmul_with_empty_groups():
    torch.manual_seed(0)
    x, w = torch.randn(9, 5), torch.randn(4, 5, 3)
    offsets = torch.tensor([2, 2, 9, 9], dtype=torch.int32)
    y = grouped_mm(x, w, offsets)
    assert torch.allclose(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
    assert torch.equal(y, grouped_mm_reference(x, w, offsets))
    with pytest.raises(ValueError, match="input features"):
        grouped_mm(torch.randn(9, 4), w, offsets)


def test_grouped_experts_equal_dense_per_token_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 6)
    torch.nn.init.normal_(experts.w_gate_up)
    torch.nn.init.normal_(experts.w_down)
    x, ids, w = torch.randn(7, 8), torch.randint(0, 4, (7, 2)), torch.rand(7, 2)
    ref = torch.zeros(7, 8)
    for t in range(7):
        for s in range(2):
            g, u = (x[t] @ experts.w_gate_up[ids[t, s]]).chunk(2)
            ref[t] += w[t, s] * ((torch.nn.functional.silu(g) * u) @ experts.w_down[ids[t, s]])
    assert torch.allclose(experts(x, ids, w), ref, atol=1e-5)


def make_router(**kw):
    torch.manual_seed(0)
    r = Router(16, RouterConfig(**kw))
    torch.nn.init.normal_(r.weight)
    return r


def test_softmax_topk_normalised_and_scaled():
    r = make_router(num_experts=8, top_k=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    out = r(torch.randn(5, 16))
    assert torch.allclose(out.gate_weights.sum(-1), torch.full((5,), 2.5))
    assert out.load.sum() == 10 and out.load.dtype == torch.long


def test_group_limited_selection_stays_in_best_groups():
    r = make_router(num_experts=8, top_k=2, n_group=4, topk_group=1)
    x = torch.randn(50, 16)
    out = r(x)
    groups = out.expert_ids // 2
    assert (groups[:, 0] == groups[:, 1]).all()  # both picks from the single allowed group
    scores = torch.softmax(x @ r.weight.t(), -1).view(50, 4, 2).amax(-1)
    assert torch.equal(groups[:, 0], scores.argmax(-1))


def test_sigmoid_and_expert_bias_affect_selection_not_weights():
    r = make_router(num_experts=4, top_k=1, score_func="sigmoid", norm_topk_prob=False, expert_bias=True)
    x = torch.randn(20, 16)
    r.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    out = r(x)
    assert (out.expert_ids == 0).all()
    assert torch.allclose(out.gate_weights[:, 0], torch.sigmoid(x @ r.weight.t())[:, 0])
    r.update_bias(torch.tensor([20, 0, 0, 0]))
    assert r.expert_bias.tolist() == pytest.approx([10 - 1e-3, 1e-3, 1e-3, 1e-3])
    assert "expert_bias" in r.state_dict()


def test_balance_losses():
    # Perfectly uniform router (zero weights): lb loss is exactly 1 at every level; z-loss = log(E)^2.
    for level in ("micro_batch", "sequence", "global_batch"):
        r = Router(16, RouterConfig(num_experts=4, top_k=2, lb_loss_coef=1.0, lb_loss_level=level, z_loss_coef=1.0))
        torch.nn.init.zeros_(r.weight)
        out = r(torch.randn(12, 16), batch_size=3)
        assert out.lb_loss.item() == pytest.approx(1.0)
        assert out.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    # Collapsed routing gives a larger loss than balanced routing, and the loss has gradients.
    r = make_router(num_experts=4, top_k=1, lb_loss_coef=1.0)
    r.weight.data[0] += 5.0
    x = torch.randn(64, 16).abs()
    out = r(x)
    assert out.lb_loss.item() > 1.0
    out.lb_loss.backward()
    assert r.weight.grad.abs().sum() > 0


def test_moe_with_shared_experts_shapes():
    moe = MoE(16, 8, RouterConfig(num_experts=4, top_k=2), num_shared_experts=1)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y, route = moe(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16) and route.expert_ids.shape == (10, 2)
