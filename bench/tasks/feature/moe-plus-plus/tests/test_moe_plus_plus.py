"""Hidden property tests of feature/moe-plus-plus, framework-neutral: each framework's tests/<framework>/probe.py
(picked by ATE_FRAMEWORK_BASE) builds the agent's MoE++ layer and models and answers in canonical terms.

Run by feature_pytest.py (bench/harness/verify_lib) with the agent's workspace first on sys.path (env ATE_WS) and the
pristine framework at ATE_BASE. Every expected value comes from the reference below, written from the definition:

    N = E + Z + C + K routing choices: [0, E) FFN experts, then Z zero, C copy, K constant experts.
    zero: 0;  copy: x;  constant c: a0 * x + a1 * value[c], (a0, a1) = softmax(mix[c] @ x).
    logits = x @ gate.T (+ residual @ residual_weight.T), then the usual score / top-k / weights.
    y = sum over a token's slots of weight * expert(x) + shared experts(x).

Canonical parameters: gate [N, H], residual [N, N], w_gate and w_up [E, I, H], w_down [E, H, I] (an FFN expert is
(silu(x w_gate^T) * (x w_up^T)) w_down^T), mix [K, 2, H], value [K, H], shared_gate/shared_up [S, H], shared_down [H, S].

A probe answers: DEVICE; KEYS (kind -> config key), defaults(), config_error(kind, value); build(spec, params) of one
MoE layer, shapes(layer), forward(layer, x [T, H], residual) -> {y, logits, weights [T, N], load [N]}, grads(layer)
(canonical names); FAMILIES and tiny_model(moepp, residual, layers, family) with residual_params, load_state,
logits_and_loss, router_trace, model_grads, model_load, reset_load; train(ws, out, steps) -> (metrics rows, log tail);
dump_pristine(base, out) and dump(out) (the feature-off tiny models: shapes, logits, losses, load, gradients).
Optional: routable(spec) (False: the framework cannot express that routing), checkpointed(model) (turns activation
checkpointing on: the model must give the same loss and gradients).
"""

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
sys.path.insert(1, str(HERE / FRAMEWORK))  # after the workspace: the probe imports the agent's framework
import probe  # noqa: E402

torch.set_num_threads(1)
DEV = probe.DEVICE
H, INTER = 16, 8


def test_imports_the_workspace():
    import importlib

    root = {"torchtitan": "torchtitan", "megatron": "megatron.core", "pithtrain": "pithtrain"}[FRAMEWORK]
    mod = importlib.import_module(root)
    assert Path(mod.__file__).resolve().is_relative_to(WS), mod.__file__


# ---- reference ----


def spec(**kw) -> dict:
    s = {
        "H": H,
        "I": INTER,
        "E": 4,
        "top_k": 2,
        "zero": 1,
        "copy": 1,
        "constant": 2,
        "shared": 0,
        "score_func": "softmax",
        "norm_topk": False,
        "scale": 1.0,
        "residual": False,
    }
    return s | kw


def n_choices(s: dict) -> int:
    return s["E"] + s["zero"] + s["copy"] + s["constant"]


def params(s: dict, seed=0) -> dict:
    """Canonical parameters of the spec, N(0, 0.5^2)."""
    n, e, i, h, k, sh = n_choices(s), s["E"], s["I"], s["H"], s["constant"], s["I"] * s["shared"]
    shapes = {"gate": (n, h), "w_gate": (e, i, h), "w_up": (e, i, h), "w_down": (e, h, i)}
    shapes |= {"residual": (n, n)} if s["residual"] else {}
    shapes |= {"mix": (k, 2, h), "value": (k, h)} if k else {}
    shapes |= {"shared_gate": (sh, h), "shared_up": (sh, h), "shared_down": (h, sh)} if sh else {}
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * 0.5).to(DEV) for name, shape in sorted(shapes.items())}


def ref_weights(logits: torch.Tensor, s: dict) -> torch.Tensor:
    """Dense combine weights [T, N] from router logits, as the top-k router defines them."""
    scores = logits.softmax(-1) if s["score_func"] == "softmax" else logits.sigmoid()
    ids = scores.topk(s["top_k"], dim=-1).indices
    w = scores.gather(1, ids)
    if s["norm_topk"]:
        w = w / w.sum(-1, keepdim=True)
    return torch.zeros_like(scores).scatter(1, ids, w * s["scale"])


def ref_moe(p: dict, x: torch.Tensor, s: dict, residual=None):
    """-> (y [T, H], logits [T, N])."""
    logits = x @ p["gate"].T
    if residual is not None:
        logits = logits + residual @ p["residual"].T
    w = ref_weights(logits, s)
    e, z, c = s["E"], s["zero"], s["copy"]
    y = torch.zeros_like(x)
    for i in range(e):
        y = y + w[:, i : i + 1] * ((F.silu(x @ p["w_gate"][i].T) * (x @ p["w_up"][i].T)) @ p["w_down"][i].T)
    y = y + w[:, e + z : e + z + c].sum(-1, keepdim=True) * x
    for k in range(s["constant"]):
        a = (x @ p["mix"][k].T).softmax(-1)
        y = y + w[:, e + z + c + k : e + z + c + k + 1] * (a[:, :1] * x + a[:, 1:] * p["value"][k])
    if s["shared"]:
        y = y + (F.silu(x @ p["shared_gate"].T) * (x @ p["shared_up"].T)) @ p["shared_down"].T
    return y, logits


def tokens(n=24, seed=1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).to(DEV)


def route_everything_to(p: dict, choice: int, x: torch.Tensor) -> None:
    """gate zero but for one entry, and x[:, 0] = 1: every token's only nonzero logit is `choice`'s, 40, so its top-1
    softmax weight is 1 in fp32 with or without top-k renormalisation (Megatron's top-1 is never renormalised)."""
    p["gate"].zero_()
    p["gate"][choice, 0] = 40.0
    x[:, 0] = 1.0


# ---- configuration and parameters ----


def test_defaults_are_off():
    assert probe.defaults() == {"zero": 0, "copy": 0, "constant": 0, "residual": False}, probe.defaults()


@pytest.mark.parametrize("kind", ["zero", "copy", "constant"])
def test_negative_count_is_a_value_error_naming_the_key(kind):
    msg = probe.config_error(kind, -1)
    assert msg is not None and probe.KEYS[kind] in msg, msg
    assert probe.config_error(kind, 2) is None


def test_parameter_names_and_shapes():
    got = probe.shapes(probe.build(spec(residual=True), None))
    want = {
        "gate": (8, H),
        "residual": (8, 8),
        "w_gate": (4, INTER, H),
        "w_up": (4, INTER, H),
        "w_down": (4, H, INTER),
        "mix": (2, 2, H),
        "value": (2, H),
    }
    assert {k: got.get(k) for k in want} == want, got
    plain = probe.shapes(probe.build(spec(zero=0, copy=0, constant=0), None))
    assert plain.get("gate") == (4, H) and not {"residual", "mix", "value"} & plain.keys(), plain
    no_res = probe.shapes(probe.build(spec(constant=0), None))
    assert no_res.get("gate") == (6, H) and not {"residual", "mix", "value"} & no_res.keys(), no_res


# ---- expert outputs ----


def routed_to(choice: int):
    s = spec(top_k=1)
    p, x = params(s), tokens()
    route_everything_to(p, choice, x)
    out = probe.forward(probe.build(s, p), x)
    want = torch.zeros(x.shape[0], 8, device=DEV)
    want[:, choice] = 1.0
    assert torch.allclose(out["weights"], want, atol=1e-6), out["weights"][:3]
    return p, x, out


def test_zero_expert_outputs_zero():
    _, _, out = routed_to(4)
    assert out["y"].abs().max().item() < 1e-6


def test_copy_expert_outputs_its_input():
    _, x, out = routed_to(5)
    assert torch.allclose(out["y"], x, atol=1e-6)


@pytest.mark.parametrize("which", [0, 1])
def test_constant_expert_output(which):
    p, x, out = routed_to(6 + which)
    a = (x @ p["mix"][which].T).softmax(-1)
    assert torch.allclose(out["y"], a[:, :1] * x + a[:, 1:] * p["value"][which], atol=1e-5)
    s = spec(top_k=1)
    p["mix"].zero_()  # an even mix: (x + v) / 2
    y = probe.forward(probe.build(s, p), x)["y"]
    assert torch.allclose(y, (x + p["value"][which]) / 2, atol=1e-6)


ROUTINGS = [
    dict(top_k=3, norm_topk=False),
    dict(top_k=2, norm_topk=True),
    dict(top_k=2, score_func="sigmoid", scale=1.5),
    dict(top_k=2, score_func="sigmoid", norm_topk=True, scale=1.5),
]


@pytest.mark.parametrize("kw", [kw for kw in ROUTINGS if getattr(probe, "routable", lambda s: True)(spec(**kw))])
def test_mixed_routing_matches_reference(kw):
    s = spec(shared=1, **kw)
    p, x = params(s), tokens(64)
    out = probe.forward(probe.build(s, p), x)
    want_y, logits = ref_moe(p, x, s)
    w = ref_weights(logits, s)
    assert torch.allclose(out["logits"].float(), logits, atol=1e-5)
    assert torch.allclose(out["weights"], w, atol=1e-6)
    chosen = set((w > 0).nonzero()[:, 1].tolist())
    assert chosen & {4, 5} and chosen & {6, 7} and chosen & {0, 1, 2, 3}, chosen  # the case covers every kind
    assert torch.allclose(out["y"], want_y, atol=1e-5)
    assert torch.equal(out["load"].long(), (w > 0).sum(0))


# ---- gating residual ----


def test_router_residual_adds_previous_logits():
    s = spec(residual=True)
    p, x = params(s), tokens(32)
    r = torch.randn(32, 8, generator=torch.Generator().manual_seed(5)).to(DEV)
    layer = probe.build(s, p)
    out = probe.forward(layer, x, r)
    want = x @ p["gate"].T + r @ p["residual"].T
    assert torch.allclose(out["logits"], want, atol=1e-5)
    assert torch.allclose(out["weights"], ref_weights(want, s), atol=1e-6)
    assert torch.allclose(probe.forward(layer, x)["logits"], x @ p["gate"].T, atol=1e-5)  # no residual given
    p["residual"].zero_()
    layer = probe.build(s, p)
    with_zero, without = probe.forward(layer, x, r), probe.forward(layer, x)
    assert torch.allclose(with_zero["logits"], without["logits"], atol=1e-6)
    assert torch.equal(with_zero["weights"], without["weights"])
    assert torch.allclose(with_zero["y"], without["y"], atol=1e-6)


def test_gradients_reach_every_new_parameter():
    s = spec(shared=1, top_k=3, residual=True)
    p, x = params(s), tokens(64)
    r = torch.randn(64, 8, generator=torch.Generator().manual_seed(7)).to(DEV).requires_grad_()
    c = torch.randn(64, H, generator=torch.Generator().manual_seed(8)).to(DEV)
    layer = probe.build(s, p)
    (probe.forward(layer, x, r)["y"] * c).sum().backward()
    got = probe.grads(layer)
    ref = {k: v.clone().requires_grad_() for k, v in p.items()}
    r_ref = r.detach().clone().requires_grad_()
    (ref_moe(ref, x, s, r_ref)[0] * c).sum().backward()
    for name in ("gate", "residual", "mix", "value", "w_gate", "w_up", "w_down"):
        assert got.get(name) is not None and got[name].abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.allclose(got[name], ref[name].grad, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(
        r.grad, r_ref.grad, rtol=1e-4, atol=1e-6
    )  # through the residual to the previous layer


# ---- the tiny model ----


def batch(seed=3):
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(seed))
    return x, x.roll(-1, dims=1)


def randomize_residual(model, std=0.5) -> None:
    """Residual weights large enough to matter."""
    with torch.no_grad():
        for w in probe.residual_params(model):
            w.normal_(0, std) if std else w.zero_()


def test_decoder_chains_residual_through_moe_layers():
    """4 layers, the first dense: MoE layer l's logits = x_l W_l^T + logits_{l-1} R_l^T (the first: x W^T)."""
    model = probe.tiny_model(moepp=True, layers=4)
    randomize_residual(model)
    seen = probe.router_trace(model, batch()[0])
    assert len(seen) == 3, len(seen)
    prev = None
    for i, (x, logits, w, r) in enumerate(seen):
        want = x.float() @ w.float().T
        if prev is not None:
            want = want + prev @ r.float().T
        assert torch.allclose(logits.float(), want, atol=1e-4), f"MoE layer {i}"
        prev = logits.float()


@pytest.mark.parametrize("family", probe.FAMILIES)
def test_zero_residual_weight_is_no_residual(family):
    with_res = probe.tiny_model(moepp=True, family=family)
    without = probe.tiny_model(moepp=True, residual=False, family=family)
    randomize_residual(with_res, 0)
    missing, unexpected = probe.load_state(without, with_res)
    assert missing == [] and len(unexpected) == len(probe.residual_params(with_res)) >= 2, (missing, unexpected)
    x, y = batch()
    (a, la), (b, lb) = probe.logits_and_loss(with_res, x, y), probe.logits_and_loss(without, x, y)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)
    randomize_residual(with_res)
    assert not torch.allclose(
        probe.logits_and_loss(with_res, x, y)[0], b, atol=1e-4
    )  # a real residual matters


@pytest.mark.parametrize("family", probe.FAMILIES)
def test_model_backward_and_load_over_all_choices(family):
    model = probe.tiny_model(moepp=True, family=family)
    randomize_residual(model)
    probe.reset_load(model)
    x, y = batch()
    _, loss = probe.logits_and_loss(model, x, y)
    loss.backward()
    assert math.isfinite(loss.item())
    load = probe.model_load(model)
    n_moe = len(probe.residual_params(model))
    assert load.shape == (n_moe, 8 + 4), load.shape  # 8 FFN experts, one zero, one copy, two constant experts
    assert load.sum(1).eq(x.numel() * 2).all(), load
    for kind in ("mix", "value", "residual", "gate"):
        got = probe.model_grads(model, kind)[1 if kind == "residual" else 0 :]  # the first MoE layer's R is unused
        assert got and all(g is not None and g.abs().sum() > 0 for g in got), f"no gradient: {kind}"


if hasattr(probe, "checkpointed"):

    @pytest.mark.parametrize("family", probe.FAMILIES)
    def test_activation_checkpointing_keeps_loss_and_gradients(family):
        model = probe.tiny_model(moepp=True, family=family)
        randomize_residual(model)
        x, y = batch()
        _, loss = probe.logits_and_loss(model, x, y)
        loss.backward()
        want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        probe.checkpointed(model)
        _, again = probe.logits_and_loss(model, x, y)
        again.backward()
        assert torch.allclose(loss, again, atol=1e-6)
        got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k


# ---- end to end ----


@pytest.mark.e2e
def test_short_training_run_learns(tmp_path):
    """20 steps of the tiny config with every MoE++ option on, through the workspace's launch entry: finite,
    decreasing loss."""
    rows, tail = probe.train(WS, tmp_path / "run", 20)
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 21)), f"{len(rows)} metrics rows; {tail}"
    assert all(map(math.isfinite, losses)), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (first, last)


@pytest.mark.e2e
def test_feature_off_model_unchanged(tmp_path):
    """MoE++ off gives the pristine framework's tiny models: same parameters, logits, losses, load and gradients (the
    pristine framework in a process of its own)."""
    base, ws = probe.dump_pristine(BASE, tmp_path / "base.pt"), probe.dump(tmp_path / "ws.pt")
    assert base.keys() == ws.keys() and base, (list(base), list(ws))
    for name in base:
        a, b = base[name], ws[name]
        assert a["shapes"] == b["shapes"], name
        for key in ("logits", "loss", "aux_loss"):
            if key in a:
                assert torch.allclose(a[key], b[key], atol=1e-5), (name, key)
        for key in ("load", "expert_load"):
            if key in a:
                assert torch.equal(a[key], b[key]), (name, key)
        assert a["grads"].keys() == b["grads"].keys(), name
        for k in a["grads"]:
            assert torch.allclose(a["grads"][k], b["grads"][k], rtol=1e-4, atol=1e-7), (name, k)
