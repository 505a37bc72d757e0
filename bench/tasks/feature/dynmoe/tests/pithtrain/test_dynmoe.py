"""Hidden property tests of feature/dynmoe (DynMoE top-any gating).

Run by feature_pytest.py (bench/harness/verify_lib) with the agent's workspace first on sys.path (env ATE_WS) and the pristine framework at
ATE_BASE.
Every expected value comes from the reference below, written from the task's definitions:

    s[t, e] = sigmoid(cos(x_t, gate.weight[e])), tau[e] = sigmoid(gate.threshold[e]); e active iff s > tau.
    K_t active experts: weight 1/K_t each, differentiated as relu(s - tau) / K_t (K_t held fixed).
    K_t = 0: the expert with the largest s gets weight 1 (no gradient).
    y = sum_e weight[t, e] * expert_e(x_t) + shared experts(x_t).
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
H, INTER, E = 16, 8, 6
THRESHOLDS = [0.1, 0.25, 0.35, 0.2, 0.3, 0.15]  # cos thresholds: tokens with 0, 1 and several active experts

import pithtrain  # noqa: E402
from pithtrain.config import ConfigError, build_config, load_config, model_classes  # noqa: E402
from pithtrain.models.blocks import MoE, RouterConfig  # noqa: E402

torch.set_num_threads(1)


def test_imports_the_workspace():
    assert Path(pithtrain.__file__).resolve().parent.parent == WS, pithtrain.__file__


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


def ref_moe(moe: MoE, x: torch.Tensor, params=None) -> torch.Tensor:
    p = dict(moe.named_parameters()) | (params or {})
    w = ref_weights(x, p["gate.weight"], p["gate.threshold"])
    y = torch.zeros_like(x)
    for i in range(w.shape[1]):
        g, u = (x @ p["experts.w_gate_up"][i]).chunk(2, dim=-1)
        y = y + w[:, i : i + 1] * ((F.silu(g) * u) @ p["experts.w_down"][i])
    if moe.shared_experts is not None:
        gate, up, down = (p[f"shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down"))
        y = y + F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    return y


def dense(route, n: int = E) -> torch.Tensor:
    """The route's combine weights as [T, E] (sum over slots naming the same expert)."""
    return torch.zeros(route.expert_ids.shape[0], n).scatter_add(
        1, route.expert_ids, route.gate_weights.float()
    )


def make_moe(shared=0, thresholds=THRESHOLDS) -> MoE:
    moe = MoE(H, INTER, RouterConfig(num_experts=E, top_k=2, gating="top_any"), num_shared_experts=shared)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(moe.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        moe.gate.threshold.copy_(torch.tensor(thresholds))
    return moe


def tokens(n=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, H, generator=g)


# ---- configuration and parameters ----


def test_config_key():
    assert RouterConfig().gating == "top_k"
    RouterConfig(gating="top_any").validate()
    with pytest.raises(ValueError, match="model.router.gating"):
        RouterConfig(gating="top_some").validate()
    for name in ("tiny-deepseek-v2-lite", "tiny-qwen3-moe"):
        assert (
            load_config(
                BASE / "configs" / f"{name}.toml", ['model.router.gating="top_any"']
            ).model.router.gating
            == "top_any"
        )
    with pytest.raises(ConfigError, match="model.router.gating"):
        load_config(BASE / "configs/tiny-deepseek-v2-lite.toml", ['model.router.gating="soft"'])


def test_parameters():
    shapes = {k: tuple(p.shape) for k, p in make_moe().named_parameters()}
    want = {
        "gate.weight": (E, H),
        "gate.threshold": (E,),
        "experts.w_gate_up": (E, H, 2 * INTER),
        "experts.w_down": (E, INTER, H),
    }
    assert {k: shapes.get(k) for k in want} == want, shapes
    plain = {k for k, _ in MoE(H, INTER, RouterConfig(num_experts=E, top_k=2)).named_parameters()}
    assert plain == {"gate.weight", "experts.w_gate_up", "experts.w_down"}
    cfg = load_config(BASE / "configs/tiny-deepseek-v2-lite.toml", ['model.router.gating="top_any"'])
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    thresholds = {k: p for k, p in model.named_parameters() if k.endswith("gate.threshold")}
    assert sorted(thresholds) == ["layers.1.mlp.gate.threshold", "layers.2.mlp.gate.threshold"]
    assert all(p.shape == (8,) and torch.equal(p, torch.zeros(8)) for p in thresholds.values())


# ---- routing ----


def test_routing_matches_reference():
    moe = make_moe()
    x = tokens()[0]
    route = moe.gate(x)
    want = ref_weights(x, moe.gate.weight, moe.gate.threshold)
    counts = (want > 0).sum(-1)
    active = (F.normalize(x, dim=-1) @ F.normalize(moe.gate.weight, dim=-1).T > moe.gate.threshold).sum(-1)
    assert {0, 1} <= set(active.tolist()) and active.max() >= 2  # the case covers fallback, one and several
    assert route.expert_ids.shape == route.gate_weights.shape and route.expert_ids.shape[0] == x.shape[0]
    assert route.expert_ids.min() >= 0 and route.expert_ids.max() < E
    got = dense(route)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal((got > 0).sum(-1), counts)  # experts per token: K_t, or 1 for a fallback token
    assert torch.equal(route.load, (want > 0).sum(0))


def test_thresholds_above_every_score_fall_back_to_top1():
    moe = make_moe(thresholds=[20.0] * E)
    x = tokens(seed=1)[0]
    got = dense(moe.gate(x))
    best = (F.normalize(x, dim=-1) @ F.normalize(moe.gate.weight, dim=-1).T).argmax(-1)
    assert torch.allclose(got, F.one_hot(best, E).float(), atol=1e-6)


def test_thresholds_below_every_score_activate_every_expert():
    moe = make_moe(thresholds=[-20.0] * E)
    route = moe.gate(tokens(seed=2)[0])
    assert torch.allclose(dense(route), torch.full((48, E), 1.0 / E), atol=1e-6)
    assert torch.equal(route.load, torch.full((E,), 48))


def test_moe_output_matches_reference():
    moe = make_moe(shared=1)
    x = tokens(seed=3)
    y, route = moe(x)
    assert y.shape == x.shape
    assert torch.allclose(y[0], ref_moe(moe, x[0]), atol=1e-5)


def test_gradients_reach_gate_weight_and_threshold():
    moe = make_moe(shared=1)
    x = tokens(seed=4)
    c = torch.randn(48, H, generator=torch.Generator().manual_seed(9))
    y, _ = moe(x)
    (y[0] * c).sum().backward()
    params = {k: p.detach().clone().requires_grad_() for k, p in moe.named_parameters()}
    (ref_moe(moe, x[0], params) * c).sum().backward()
    for name in (
        "gate.weight",
        "gate.threshold",
        "experts.w_gate_up",
        "experts.w_down",
        "shared_experts.gate_proj.weight",
    ):
        got = dict(moe.named_parameters())[name].grad
        assert got is not None and got.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.allclose(got, params[name].grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("name", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_model_forward_backward(name):
    cfg = load_config(BASE / "configs" / f"{name}.toml", ['model.router.gating="top_any"'])
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    out = model(x, labels=x.roll(-1, dims=1))
    (out.loss + out.aux_loss).backward()
    assert math.isfinite(out.loss.item()) and out.expert_load.shape[1] == 8
    per_layer = out.expert_load.sum(1)
    assert (
        (per_layer >= x.numel()).all()
        and (per_layer <= 8 * x.numel()).all()
        and (per_layer > 2 * x.numel()).any()
    )
    for k, p in model.named_parameters():
        if k.endswith("gate.threshold"):
            assert p.grad is not None and p.grad.abs().sum() > 0, k


# ---- end to end ----


@pytest.mark.e2e
def test_short_training_run_learns_and_logs_active_experts(tmp_path):
    """20 CPU steps of the tiny DeepSeek config with top-any gating: finite, decreasing loss, and
    `active_experts` per MoE layer; step 1's value is recomputed from the initial model and first batch."""
    run = tmp_path / "run"
    sets = {
        "model.router.gating": '"top_any"',
        "train.steps": 20,
        "train.micro_batch_size": 4,
        "train.seq_len": 64,
        "train.log_every": 5,
        "train.eval_batches": 1,
        "checkpoint.enabled": "false",
        "train.run_dir": run,
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
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    losses = [row["loss"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, 21)) and all(map(math.isfinite, losses)), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (first, last)
    for row in rows:
        active = row.get("active_experts")
        assert isinstance(active, list) and len(active) == 2, (
            f"step {row['step']}: active_experts = {active!r}"
        )
        assert all(1.0 <= v <= 8.0 for v in active), active

    from pithtrain.data import DataLoader, TokenShards, builtin_dataset

    raw = json.loads((run / "config.json").read_text())
    raw.pop("source", None)
    cfg = build_config(raw)
    torch.manual_seed(cfg.train.seed)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    t = cfg.train
    loader = DataLoader(
        TokenShards(builtin_dataset()), t.seq_len, t.micro_batch_size, t.grad_accum, seed=t.seed
    )
    with torch.no_grad():  # step 1: the initial weights on the first optimizer step's micro-batches
        load = sum(model(*loader.next_batch(), return_logits=False).expert_load for _ in range(t.grad_accum))
    want = (load.sum(1).float() / (t.seq_len * t.micro_batch_size * t.grad_accum)).tolist()
    assert all(abs(a - b) < 0.01 for a, b in zip(rows[0]["active_experts"], want)), (
        rows[0]["active_experts"],
        want,
    )


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
