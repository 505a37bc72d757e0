"""Hidden property tests of feature/dynmoe (DynMoE top-any gating), shared by every framework.

Run by feature_pytest.py (bench/harness/verify_lib) with the agent's workspace first on sys.path (env ATE_WS), the
pristine framework at ATE_BASE and the framework in ATE_FRAMEWORK_BASE, whose `<framework>/probe.py` beside this
file builds the feature's modules from the workspace and answers in the canonical terms below. Every expected value
comes from the reference here, written from the task's definitions:

    s[t, e] = sigmoid(cos(x_t, gate.weight[e])), tau[e] = sigmoid(gate.threshold[e]); e active iff s > tau.
    K_t active experts: weight 1/K_t each, differentiated as relu(s - tau) / K_t (K_t held fixed).
    K_t = 0: the expert with the largest s gets weight 1 (no gradient).
    y = sum_e weight[t, e] * expert_e(x_t) + shared experts(x_t),
    expert_e(x) = (silu(x @ experts.w_gate[e]) * (x @ experts.w_up[e])) @ experts.w_down[e], the shared one alike.

Canonical parameters: gate.weight [E, H], gate.threshold [E], experts.w_gate / w_up [E, H, I],
experts.w_down [E, I, H], shared.w_gate / w_up [H, S], shared.w_down [S, H] (S = I x shared experts).

A probe answers: package_root(); KEY, configured_gating(value), config_error(value) (the config key);
Layer(H, I, E, shared, gating) with shapes(), load(canonical params), route(x [T, H]) -> (weights [T, E], load [E]),
forward(x) -> y [T, H], grads() (canonical); FAMILIES and tiny_model(family) (the tiny model with the feature on:
loss, thresholds, (token, expert) pairs per MoE layer, threshold gradients); train(run, steps) -> (metrics rows,
per step and MoE layer the experts per token the routers returned); dump_pristine(base, out) and dump() (the
feature-off tiny models: shapes, logits, losses, gradients).
"""

import importlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WS, BASE = Path(os.environ["ATE_WS"]).resolve(), Path(os.environ["ATE_BASE"]).resolve()
FRAMEWORK = os.environ.get("ATE_FRAMEWORK_BASE", "pithtrain")
HERE = Path(__file__).resolve().parent
H, INTER, E = 16, 8, 6
THRESHOLDS = [0.1, 0.25, 0.35, 0.2, 0.3, 0.15]  # cos thresholds: tokens with 0, 1 and several active experts
STEPS = 20

sys.path.insert(0, str(HERE / FRAMEWORK))
probe = importlib.import_module("probe")
torch.set_num_threads(1)


def test_imports_the_workspace():
    assert probe.package_root() == WS, probe.package_root()


# ---- reference ----


def ref_weights(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Dense combine weights [T, E] of top-any gating, with the straight-through gradient."""
    s = (F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T).sigmoid()
    margin = F.relu(s - threshold.sigmoid())
    active = margin > 0
    count = active.sum(-1, keepdim=True)
    step = margin + (active.float() - margin).detach()
    best = F.one_hot(s.argmax(-1), weight.shape[0]).float()
    return torch.where(count > 0, step / count.clamp_min(1), best)


def ref_moe(p: dict, x: torch.Tensor) -> torch.Tensor:
    w = ref_weights(x, p["gate.weight"], p["gate.threshold"])
    y = torch.zeros_like(x)
    for e in range(w.shape[1]):
        h = F.silu(x @ p["experts.w_gate"][e]) * (x @ p["experts.w_up"][e])
        y = y + w[:, e : e + 1] * (h @ p["experts.w_down"][e])
    if "shared.w_gate" in p:
        y = y + (F.silu(x @ p["shared.w_gate"]) * (x @ p["shared.w_up"])) @ p["shared.w_down"]
    return y


def canonical_shapes(shared: int) -> dict:
    shapes = {
        "gate.weight": (E, H),
        "gate.threshold": (E,),
        "experts.w_gate": (E, H, INTER),
        "experts.w_up": (E, H, INTER),
        "experts.w_down": (E, INTER, H),
    }
    if shared:
        shapes |= {"shared.w_gate": (H, shared * INTER), "shared.w_up": (H, shared * INTER)}
        shapes |= {"shared.w_down": (shared * INTER, H)}
    return shapes


def make_layer(shared=0, thresholds=THRESHOLDS):
    """(the framework's MoE layer with top-any gating, holding `params`, params: the canonical values)."""
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) * 0.5 for k, s in sorted(canonical_shapes(shared).items())}
    params["gate.threshold"] = torch.tensor(thresholds)
    layer = probe.Layer(H, INTER, E, shared, gating="top_any")
    layer.load(params)
    return layer, params


def tokens(n=48, seed=0) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


# ---- configuration and parameters ----


def test_config_key():
    assert probe.configured_gating(None) == "top_k"
    assert probe.configured_gating("top_any") == "top_any"
    message = probe.config_error("top_some")
    assert message is not None and probe.KEY in message, message


def test_parameters():
    layer = probe.Layer(H, INTER, E, 0, gating="top_any")
    want = canonical_shapes(0)
    assert {k: layer.shapes().get(k) for k in want} == want, layer.shapes()
    plain = probe.Layer(H, INTER, E, 0, gating=None)
    assert "gate.threshold" not in plain.shapes() and set(plain.shapes()) == set(want) - {"gate.threshold"}
    thresholds = probe.tiny_model(probe.FAMILIES[0])["thresholds"]
    assert len(thresholds) == 2, list(thresholds)  # the two MoE layers of the tiny model
    assert all(t.shape == (8,) and torch.equal(t, torch.zeros(8)) for t in thresholds.values()), thresholds


# ---- routing ----


def test_routing_matches_reference():
    layer, p = make_layer()
    x = tokens()
    weights, load = layer.route(x)
    want = ref_weights(x, p["gate.weight"], p["gate.threshold"])
    active = (F.normalize(x, dim=-1) @ F.normalize(p["gate.weight"], dim=-1).T > p["gate.threshold"]).sum(-1)
    assert {0, 1} <= set(active.tolist()) and active.max() >= 2  # the case covers fallback, one and several
    assert weights.shape == want.shape
    assert torch.allclose(weights, want, atol=1e-6), (weights - want).abs().max()
    assert torch.equal((weights > 0).sum(-1), (want > 0).sum(-1))  # experts per token: K_t, or 1 on fallback
    assert torch.equal(load, (want > 0).sum(0)), load


def test_thresholds_above_every_score_fall_back_to_top1():
    layer, p = make_layer(thresholds=[20.0] * E)
    x = tokens(seed=1)
    weights, _ = layer.route(x)
    best = (F.normalize(x, dim=-1) @ F.normalize(p["gate.weight"], dim=-1).T).argmax(-1)
    assert torch.allclose(weights, F.one_hot(best, E).float(), atol=1e-6)


def test_thresholds_below_every_score_activate_every_expert():
    layer, _ = make_layer(thresholds=[-20.0] * E)
    weights, load = layer.route(tokens(seed=2))
    assert torch.allclose(weights, torch.full((48, E), 1.0 / E), atol=1e-6)
    assert torch.equal(load, torch.full((E,), 48))


def test_moe_output_matches_reference():
    layer, p = make_layer(shared=1)
    x = tokens(seed=3)
    y = layer.forward(x)
    assert y.shape == x.shape
    assert torch.allclose(y.detach().cpu(), ref_moe(p, x), atol=1e-5)


def test_gradients_reach_gate_weight_and_threshold():
    layer, p = make_layer(shared=1)
    x = tokens(seed=4)
    c = torch.randn(48, H, generator=torch.Generator().manual_seed(9))
    (layer.forward(x).cpu() * c).sum().backward()
    got = layer.grads()
    params = {k: v.clone().requires_grad_() for k, v in p.items()}
    (ref_moe(params, x) * c).sum().backward()
    for name in (
        "gate.weight",
        "gate.threshold",
        "experts.w_gate",
        "experts.w_up",
        "experts.w_down",
        "shared.w_gate",
    ):
        g = got.get(name)
        assert g is not None and g.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.allclose(g, params[name].grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", probe.FAMILIES)
def test_model_forward_backward(family):
    """A tiny model with top-any gating: finite loss, experts per token between 1 and 8 with some tokens taking
    several, and gradients reaching every threshold."""
    out = probe.tiny_model(family)
    assert math.isfinite(out["loss"]), out["loss"]
    per_layer = torch.tensor(out["pairs"], dtype=torch.float)
    n = out["tokens"]
    assert len(per_layer) == len(out["threshold_grads"]) >= 2, (per_layer, list(out["threshold_grads"]))
    assert (per_layer >= n).all() and (per_layer <= 8 * n).all() and (per_layer > 2 * n).any(), (per_layer, n)
    for name, g in out["threshold_grads"].items():
        assert g is not None and g.abs().sum() > 0, f"no gradient reaches {name}"


# ---- end to end ----


@pytest.mark.e2e
def test_short_training_run_learns_and_logs_active_experts(tmp_path):
    """STEPS steps of the tiny config with top-any gating through the workspace's launch entry: finite, decreasing
    loss, and `active_experts` per MoE layer on every metrics row, equal to what the run's routers returned (the
    probe records every router output of the run with a forward hook)."""
    assert probe.configured_gating("top_any") == "top_any"  # else the run cannot have the feature on
    rows, seen = probe.train(tmp_path / "run", STEPS)
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), [row["step"] for row in rows]
    assert all(map(math.isfinite, losses)), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (first, last)
    assert len(seen) == STEPS, f"the routers ran {len(seen)} optimizer steps' forwards, expected {STEPS}"
    for row, want in zip(rows, seen):
        active = row.get("active_experts")
        assert isinstance(active, list) and len(active) == 2, (
            f"step {row['step']}: active_experts = {active!r}"
        )
        assert all(1.0 <= v <= 8.0 for v in active), active
        assert all(abs(a - b) < 0.01 for a, b in zip(active, want)), (row["step"], active, want)


@pytest.mark.e2e
def test_feature_off_model_unchanged(tmp_path):
    """Defaults give the pristine framework's tiny models: same parameters, logits, losses, expert load and
    gradients (the pristine framework in a process of its own)."""
    base, ws = probe.dump_pristine(BASE, tmp_path / "base.pt"), probe.dump()
    assert base.keys() == ws.keys() and base, (list(base), list(ws))
    for name in base:
        a, b = base[name], ws[name]
        assert a["shapes"] == b["shapes"], name
        for key in ("logits", "loss", "aux_loss"):
            if key in a:
                assert torch.allclose(a[key], b[key], atol=1e-5), (name, key)
        if "expert_load" in a:
            assert torch.equal(a["expert_load"], b["expert_load"]), name
        assert a["grads"].keys() == b["grads"].keys(), name
        for k in a["grads"]:
            assert torch.allclose(a["grads"][k], b["grads"][k], rtol=1e-4, atol=1e-7), (name, k)
