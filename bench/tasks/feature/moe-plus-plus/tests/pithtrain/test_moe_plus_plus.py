"""Hidden property tests of feature/moe-plus-plus (MoE++: zero, copy and constant experts, gating residuals).

Run by feature_pytest.py (bench/harness/verify_lib) with the agent's workspace first on sys.path (env ATE_WS) and the pristine framework at
ATE_BASE.
Every expected value comes from the reference below, written from the task's definitions:

    N = E + Z + C + K routing choices: [0, E) FFN experts, then Z zero, C copy, K constant experts.
    zero: 0;  copy: x;  constant c: a0 * x + a1 * value[c], (a0, a1) = softmax(w_mix[c] @ x).
    logits = x @ gate.weight.T (+ residual @ gate.residual_weight.T), then the usual score / top-k / weights.
    y = sum over a token's slots of weight * expert(x) + shared experts(x).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WS, BASE = Path(os.environ["ATE_WS"]).resolve(), Path(os.environ["ATE_BASE"]).resolve()
HERE = Path(__file__).resolve().parent  # its parent holds dump.py, copied from bench/harness/verify_lib
H, INTER = 16, 8

import pithtrain  # noqa: E402
from pithtrain.config import ConfigError, load_config, model_classes  # noqa: E402
from pithtrain.models.blocks import MoE, RouterConfig  # noqa: E402

torch.set_num_threads(1)


def test_imports_the_workspace():
    assert Path(pithtrain.__file__).resolve().parent.parent == WS, pithtrain.__file__


# ---- reference ----


def ref_weights(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Dense combine weights [T, N] from router logits, as the top-k router defines them."""
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    ids = scores.topk(cfg.top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return torch.zeros_like(scores).scatter(1, ids, w * cfg.routed_scaling_factor)


def ref_moe(moe: MoE, x: torch.Tensor, cfg: RouterConfig, residual=None, params=None):
    """-> (y [T, H], logits [T, N]); `params` overrides moe's parameters by name (for reference gradients)."""
    p = dict(moe.named_parameters()) | (params or {})
    logits = x @ p["gate.weight"].T
    if residual is not None:
        logits = logits + residual @ p["gate.residual_weight"].T
    w = ref_weights(logits, cfg)
    e, z, c = cfg.num_experts, cfg.num_zero_experts, cfg.num_copy_experts
    y = torch.zeros_like(x)
    for i in range(e):
        g, u = (x @ p["experts.w_gate_up"][i]).chunk(2, dim=-1)
        y = y + w[:, i : i + 1] * ((F.silu(g) * u) @ p["experts.w_down"][i])
    y = y + w[:, e + z : e + z + c].sum(-1, keepdim=True) * x
    for k in range(cfg.num_constant_experts):
        a = (x @ p["constant_experts.w_mix"][k].T).softmax(-1)
        y = y + w[:, e + z + c + k : e + z + c + k + 1] * (
            a[:, :1] * x + a[:, 1:] * p["constant_experts.value"][k]
        )
    if moe.shared_experts is not None:
        gate, up, down = (p[f"shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down"))
        y = y + F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    return y, logits


def dense(route, n: int) -> torch.Tensor:
    """The route's combine weights as [T, N] (sum over slots naming the same expert)."""
    return torch.zeros(route.expert_ids.shape[0], n).scatter_add(
        1, route.expert_ids, route.gate_weights.float()
    )


def make_moe(seed=0, shared=0, **kw) -> tuple[MoE, RouterConfig]:
    cfg = RouterConfig(
        **{
            "num_experts": 4,
            "top_k": 2,
            "num_zero_experts": 1,
            "num_copy_experts": 1,
            "num_constant_experts": 2,
            **kw,
        }
    )
    cfg.validate()
    moe = MoE(H, INTER, cfg, num_shared_experts=shared)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(moe.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return moe, cfg


def tokens(n=24, seed=1) -> torch.Tensor:
    return torch.randn(1, n, H, generator=torch.Generator().manual_seed(seed))


def route_everything_to(moe: MoE, expert: int, x: torch.Tensor) -> None:
    """gate.weight zero but for one entry, and x[..., 0] = 1: every token's only large logit is `expert`'s."""
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[expert, 0] = 12.0
        x[..., 0] = 1.0


# ---- configuration and parameters ----


def test_config_keys_and_defaults():
    cfg = RouterConfig()
    assert (cfg.num_zero_experts, cfg.num_copy_experts, cfg.num_constant_experts, cfg.gating_residual) == (
        0,
        0,
        0,
        False,
    )
    for key in ("num_zero_experts", "num_copy_experts", "num_constant_experts"):
        with pytest.raises(ValueError, match=f"model.router.{key}"):
            RouterConfig(**{key: -1}).validate()
    sets = [
        "model.router.num_zero_experts=1",
        "model.router.num_copy_experts=1",
        "model.router.num_constant_experts=2",
        "model.router.gating_residual=true",
    ]
    for name in ("tiny-deepseek-v2-lite", "tiny-qwen3-moe"):
        r = load_config(BASE / "configs" / f"{name}.toml", sets).model.router
        assert (r.num_zero_experts, r.num_copy_experts, r.num_constant_experts, r.gating_residual) == (
            1,
            1,
            2,
            True,
        )
    with pytest.raises(ConfigError, match="model.router.num_copy_experts"):
        load_config(BASE / "configs/tiny-deepseek-v2-lite.toml", ["model.router.num_copy_experts=-2"])


def test_parameter_names_and_shapes():
    moe, _ = make_moe(gating_residual=True)
    shapes = {k: tuple(p.shape) for k, p in moe.named_parameters()}
    assert shapes["gate.weight"] == (8, H) and shapes["gate.residual_weight"] == (8, 8)
    assert shapes["experts.w_gate_up"] == (4, H, 2 * INTER) and shapes["experts.w_down"] == (4, INTER, H)
    assert shapes["constant_experts.w_mix"] == (2, 2, H) and shapes["constant_experts.value"] == (2, H)
    plain = {k for k, _ in MoE(H, INTER, RouterConfig(num_experts=4, top_k=2)).named_parameters()}
    assert plain == {"gate.weight", "experts.w_gate_up", "experts.w_down"}
    no_res = {k for k, _ in make_moe(num_constant_experts=0)[0].named_parameters()}
    assert "gate.residual_weight" not in no_res and not any(k.startswith("constant_experts") for k in no_res)


# ---- expert outputs ----


def test_zero_expert_outputs_zero():
    moe, _ = make_moe(top_k=1, norm_topk_prob=True)
    x = tokens()
    route_everything_to(moe, 4, x)
    y, route = moe(x)
    assert (route.expert_ids == 4).all()
    assert torch.allclose(route.gate_weights, torch.ones_like(route.gate_weights))
    assert y.abs().max().item() < 1e-6


def test_copy_expert_outputs_its_input():
    moe, _ = make_moe(top_k=1, norm_topk_prob=True)
    x = tokens()
    route_everything_to(moe, 5, x)
    y, route = moe(x)
    assert (route.expert_ids == 5).all()
    assert torch.allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("which", [0, 1])
def test_constant_expert_output(which):
    moe, _ = make_moe(top_k=1, norm_topk_prob=True)
    x = tokens()
    route_everything_to(moe, 6 + which, x)
    y, route = moe(x)
    assert (route.expert_ids == 6 + which).all()
    a = (x[0] @ moe.constant_experts.w_mix[which].T).softmax(-1)
    want = a[:, :1] * x[0] + a[:, 1:] * moe.constant_experts.value[which]
    assert torch.allclose(y[0], want, atol=1e-5)
    with torch.no_grad():
        moe.constant_experts.w_mix.zero_()  # an even mix: (x + v) / 2
    y, _ = moe(x)
    assert torch.allclose(y[0], (x[0] + moe.constant_experts.value[which]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=3, norm_topk_prob=False),
        dict(top_k=2, norm_topk_prob=True),
        dict(top_k=2, score_func="sigmoid", routed_scaling_factor=1.5),
    ],
)
def test_mixed_routing_matches_reference(kw):
    moe, cfg = make_moe(shared=1, **kw)
    x = tokens(64)
    y, route = moe(x)
    want_y, logits = ref_moe(moe, x[0], cfg)
    assert route.expert_ids.min() >= 0 and route.expert_ids.max() < 8
    assert torch.allclose(dense(route, 8), ref_weights(logits, cfg), atol=1e-6)
    chosen = set(route.expert_ids[dense(route, 8).gather(1, route.expert_ids) > 0].tolist())
    assert chosen & {4, 5} and chosen & {6, 7} and chosen & {0, 1, 2, 3}, chosen  # the case covers every kind
    assert torch.allclose(y[0], want_y, atol=1e-5)
    assert torch.equal(route.load, (ref_weights(logits, cfg) > 0).sum(0))


# ---- gating residual ----


def test_router_residual_adds_previous_logits():
    moe, cfg = make_moe(gating_residual=True)
    x, r = tokens(32)[0], torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    out = moe.gate(x, residual=r)
    want = x @ moe.gate.weight.T + r @ moe.gate.residual_weight.T
    assert torch.allclose(out.logits, want, atol=1e-5)
    assert torch.allclose(dense(out, 8), ref_weights(want, cfg), atol=1e-6)
    assert torch.allclose(moe.gate(x).logits, x @ moe.gate.weight.T, atol=1e-5)  # no residual given
    with torch.no_grad():
        moe.gate.residual_weight.zero_()
    with_zero, without = moe.gate(x, residual=r), moe.gate(x)
    assert torch.allclose(with_zero.logits, without.logits, atol=1e-6)
    assert torch.equal(with_zero.expert_ids, without.expert_ids)
    y0, _ = moe(x[None], residual=r)
    y1, _ = moe(x[None])
    assert torch.allclose(y0, y1, atol=1e-6)


def test_gradients_reach_every_new_parameter():
    moe, cfg = make_moe(shared=1, top_k=3, gating_residual=True)
    x = tokens(64)
    r = torch.randn(64, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    c = torch.randn(64, H, generator=torch.Generator().manual_seed(8))
    y, _ = moe(x, residual=r)
    (y[0] * c).sum().backward()
    params = {k: p.detach().clone().requires_grad_() for k, p in moe.named_parameters()}
    r_ref = r.detach().clone().requires_grad_()
    want, _ = ref_moe(moe, x[0], cfg, residual=r_ref, params=params)
    (want * c).sum().backward()
    for name in (
        "gate.weight",
        "gate.residual_weight",
        "constant_experts.w_mix",
        "constant_experts.value",
        "experts.w_gate_up",
        "experts.w_down",
    ):
        got = dict(moe.named_parameters())[name].grad
        assert got is not None and got.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.allclose(got, params[name].grad, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(
        r.grad, r_ref.grad, rtol=1e-4, atol=1e-6
    )  # through the residual to the previous layer


def tiny_model(name="tiny-deepseek-v2-lite", residual=True, sets=()):
    sets = [
        "model.router.num_zero_experts=1",
        "model.router.num_copy_experts=1",
        "model.router.num_constant_experts=2",
        f"model.router.gating_residual={str(residual).lower()}",
        *sets,
    ]
    cfg = load_config(BASE / "configs" / f"{name}.toml", sets)
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    with torch.no_grad():  # residual weights large enough to matter
        for k, p in model.named_parameters():
            if k.endswith("residual_weight"):
                p.normal_(0, 0.5)
    return model, cfg


def batch(seed=3):
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(seed))
    return x, x.roll(-1, dims=1)


def test_decoder_chains_residual_through_moe_layers():
    """4 layers, the first dense: MoE layer l's logits = x_l W_l^T + logits_{l-1} R_l^T (the first: x W^T)."""
    model, _ = tiny_model(sets=["model.num_hidden_layers=4"])
    seen = []

    def hook(module, args, kwargs, out):
        seen.append(((args[0] if args else kwargs["x"]).detach(), out.logits.detach(), module))

    gates = [layer.mlp.gate for layer in model.layers.values() if hasattr(layer.mlp, "gate")]
    assert len(gates) == 3
    for g in gates:
        g.register_forward_hook(hook, with_kwargs=True)
    model(*batch())
    assert [m for _, _, m in seen] == gates
    prev = None
    for i, (x, logits, gate) in enumerate(seen):
        want = x.float() @ gate.weight.detach().T
        if prev is not None:
            want = want + prev @ gate.residual_weight.detach().T
        assert torch.allclose(logits, want, atol=1e-4), f"MoE layer {i}"
        prev = logits


@pytest.mark.parametrize("name", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_zero_residual_weight_is_no_residual(name):
    with_res, _ = tiny_model(name)
    without, _ = tiny_model(name, residual=False)
    with torch.no_grad():
        for k, p in with_res.named_parameters():
            if k.endswith("residual_weight"):
                p.zero_()
    missing, unexpected = without.load_state_dict(with_res.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.endswith("residual_weight") for k in unexpected), unexpected
    x, y = batch()
    a, b = with_res(x, labels=y), without(x, labels=y)
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.allclose(a.loss, b.loss, atol=1e-6)
    with torch.no_grad():
        for k, p in with_res.named_parameters():
            if k.endswith("residual_weight"):
                p.normal_(0, 0.5)
    assert not torch.allclose(
        with_res(x, labels=y).logits, b.logits, atol=1e-4
    )  # a real residual changes routing


@pytest.mark.parametrize("name", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_model_backward_and_activation_checkpointing(name):
    model, cfg = tiny_model(name)
    x, y = batch()
    out = model(x, labels=y)
    (out.loss + out.aux_loss).backward()
    assert math.isfinite(out.loss.item())
    r = cfg.model.router
    assert out.expert_load.shape[1] == r.num_experts + 4  # one zero, one copy, two constant experts
    assert out.expert_load.sum(1).eq(x.numel() * r.top_k).all()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for k in ("constant_experts.w_mix", "constant_experts.value", "gate.residual_weight"):
        assert any(name.endswith(k) and g.abs().sum() > 0 for name, g in grads.items()), (
            f"no gradient for *{k}"
        )
    model.zero_grad()
    model.activation_checkpointing = True
    out2 = model(x, labels=y)
    (out2.loss + out2.aux_loss).backward()
    assert torch.allclose(out.loss, out2.loss, atol=1e-6)
    for k, p in model.named_parameters():
        if k in grads:
            assert torch.allclose(p.grad, grads[k], rtol=1e-4, atol=1e-6), k


# ---- end to end ----


@pytest.mark.e2e
def test_short_training_run_learns(tmp_path):
    """20 CPU steps of the tiny DeepSeek config with every MoE++ feature on: finite and decreasing loss."""
    sets = {
        "model.router.num_zero_experts": 1,
        "model.router.num_copy_experts": 1,
        "model.router.num_constant_experts": 2,
        "model.router.gating_residual": "true",
        "train.steps": 20,
        "train.micro_batch_size": 4,
        "train.seq_len": 64,
        "train.log_every": 5,
        "train.eval_batches": 1,
        "checkpoint.enabled": "false",
        "train.run_dir": tmp_path / "run",
    }
    cmd = [
        sys.executable,
        "-m",
        "pithtrain.train",
        "--config",
        str(BASE / "configs/tiny-deepseek-v2-lite.toml"),
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, cwd=WS, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if line]
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 21)) and all(map(math.isfinite, losses)), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (first, last)
    assert all(len(row["load_cv"]) == 2 for row in rows)


@pytest.mark.e2e
def test_feature_off_model_unchanged(tmp_path):
    """Defaults give the pristine framework's tiny models: same parameters, logits, losses and gradients."""
    procs = {}
    for label, root in (("base", BASE), ("ws", WS)):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        procs[label] = subprocess.Popen(
            [sys.executable, str(HERE.parent / "dump.py"), str(BASE / "configs"), str(tmp_path / f"{label}.pt")],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for label, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{label}: {out[-2000:]}"
    base, ws = (torch.load(tmp_path / f"{label}.pt") for label in ("base", "ws"))
    for name in base:
        a, b = base[name], ws[name]
        assert a["shapes"] == b["shapes"], name
        for key in ("logits", "loss", "aux_loss"):
            assert torch.allclose(a[key], b[key], atol=1e-5), (name, key)
        assert torch.equal(a["expert_load"], b["expert_load"]), name
        assert a["grads"].keys() == b["grads"].keys(), name
        for k in a["grads"]:
            assert torch.allclose(a["grads"][k], b["grads"][k], rtol=1e-4, atol=1e-7), (name, k)
