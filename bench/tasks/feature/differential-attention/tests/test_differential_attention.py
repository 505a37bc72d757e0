"""Hidden property tests of differential attention, the same on every framework: the reference below is the
instruction's definition on canonical parameters; `<framework>/probe.py` ($ATE_FRAMEWORK_BASE) builds the agent's
model at the canonical tiny shapes, loads canonical parameters into a layer's attention and answers in canonical
terms. Run by feature_pytest.py (props: everything not marked e2e; e2e: the pristine comparison and a training run).

Canonical attention parameters of one layer (weights [out, in], as nn.Linear):
    wq [H*(dn+dr), D] (or wq_a [rq, D], q_norm [rq], wq_b [H*(dn+dr), rq]), wkv_a [kv+dr, D], kv_norm [kv],
    wkv_b [H*(dn+dv), kv], wo [D, H*dv], lambda_q1/k1/q2/k2 [dn+dr], head_norm [2*dv]
Per head, q and k are [nope | rope] and wkv_b's rows [k_nope | v]; RoPE rotates feature pairs (2i, 2i+1) of the rope
part by position * theta^(-2i/dr) (a framework that rotates a permutation of those features computes the same scores).

    python test_differential_attention.py pristine <out.pt>   (PYTHONPATH = the pristine framework: its feature-off
    outputs; test.sh runs it before the tests and gives the file to them as $ATE_PRISTINE)
"""

import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
FRAMEWORK = os.environ.get("ATE_FRAMEWORK_BASE", "pithtrain")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = {  # canonical shapes: exact checks in milliseconds; v_head_dim != qk_head_dim on purpose
    "vocab": 128, "dim": 32, "inter": 48, "moe_inter": 16, "layers": 3, "dense_layers": 1, "heads": 4,
    "q_lora_rank": 0, "kv_lora_rank": 16, "nope": 8, "rope": 4, "v": 6, "experts": 4, "top_k": 2, "shared": 1,
    "eps": 1e-6, "theta": 10000.0, "seq": 16, "yarn": None,
}  # fmt: skip
PROPERTY_MODELS = {"mha4": TINY, "qlora6": {**TINY, "heads": 6, "q_lora_rank": 8, "layers": 2, "v": 10}}
# The disabled path must reproduce the pristine model exactly, YaRN included (factor, original context).
# "groups": group-limited routing (groups, groups kept per token).
UNCHANGED_MODELS = {
    "tiny_yarn": {**TINY, "yarn": (4.0, 8)},
    "qlora_grouped": {**TINY, "q_lora_rank": 8, "groups": (2, 1)},
}
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
NEW = (*LAMBDAS, "head_norm")


def load_probe():
    spec = importlib.util.spec_from_file_location(f"probe_{FRAMEWORK}", HERE / FRAMEWORK / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_imported_from(root: str) -> None:
    """The framework package must come from `root` (the workspace, or the pristine copy), not from site-packages."""
    module = importlib.import_module(probe.PACKAGE)
    if not Path(module.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise ImportError(f"{probe.PACKAGE} was imported from {module.__file__}, not from {root}")


probe = load_probe()
if __name__ != "__main__" and os.environ.get("ATE_WS"):
    check_imported_from(os.environ["ATE_WS"])


# ---- the reference: the instruction's definition on canonical parameters ----


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, S, heads, d]: rotate pairs (x[2i], x[2i+1]) by position * theta^(-2i/d)."""
    seq, d = x.shape[1], x.shape[-1]
    angle = torch.arange(seq, dtype=torch.float32, device=x.device)[:, None] * theta ** (
        -torch.arange(0, d, 2, device=x.device) / d
    )
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def mla_qkv(p: dict, m: dict, x: torch.Tensor):
    """q, k [B, H, S, dn+dr], v [B, H, S, dv] of MLA with plain RoPE."""
    batch, seq, _ = x.shape
    heads, nope, rp, eps = m["heads"], m["nope"], m["rope"], m["eps"]
    if m["q_lora_rank"]:
        q = F.linear(rms(F.linear(x, p["wq_a"]), p["q_norm"], eps), p["wq_b"])
    else:
        q = F.linear(x, p["wq"])
    q = q.view(batch, seq, heads, nope + rp)
    latent, k_rope = F.linear(x, p["wkv_a"]).split([m["kv_lora_rank"], rp], -1)
    kv = F.linear(rms(latent, p["kv_norm"], eps), p["wkv_b"])
    k_nope, v = kv.view(batch, seq, heads, nope + m["v"]).split([nope, m["v"]], -1)
    q = torch.cat([q[..., :nope], rope(q[..., nope:], m["theta"])], -1)
    k = torch.cat([k_nope, rope(k_rope[:, :, None], m["theta"]).expand(-1, -1, heads, -1)], -1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def softmax_causal(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    seq = q.shape[-2]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    return ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, -math.inf).softmax(-1)


def lambda_init(layer: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


def reference(p: dict, m: dict, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The differential attention layer's output [B, S, D] for input x."""
    q, k, v = mla_qkv(p, m, x)
    scale = (m["nope"] + m["rope"]) ** -0.5
    a1, a2 = softmax_causal(q[:, 0::2], k[:, 0::2], scale), softmax_causal(q[:, 1::2], k[:, 1::2], scale)
    lam0 = lambda_init(layer)
    lam = torch.exp(p["lambda_q1"] @ p["lambda_k1"]) - torch.exp(p["lambda_q2"] @ p["lambda_k2"]) + lam0
    values = torch.cat([v[:, 0::2], v[:, 1::2]], -1)  # head j: values of heads 2j, 2j+1 side by side
    out = rms((a1 - lam * a2) @ values, p["head_norm"], m["eps"]) * (1 - lam0)
    return F.linear(out.transpose(1, 2).flatten(2), p["wo"])


def canonical_params(m: dict, seed: int) -> dict:
    """Random canonical parameters far from init (lambda vectors and norms too), so every term shows."""
    g = torch.Generator().manual_seed(seed)
    d, qk, heads = m["dim"], m["nope"] + m["rope"], m["heads"]
    shapes = {"wkv_a": (m["kv_lora_rank"] + m["rope"], d), "kv_norm": (m["kv_lora_rank"],),
              "wkv_b": (heads * (m["nope"] + m["v"]), m["kv_lora_rank"]), "wo": (d, heads * m["v"]),
              **{lam: (qk,) for lam in LAMBDAS}, "head_norm": (2 * m["v"],)}  # fmt: skip
    if m["q_lora_rank"]:
        shapes.update(
            wq_a=(m["q_lora_rank"], d), q_norm=(m["q_lora_rank"],), wq_b=(heads * qk, m["q_lora_rank"])
        )
    else:
        shapes["wq"] = (heads * qk, d)
    params = {}
    for name, shape in shapes.items():
        r = torch.randn(shape, generator=g)
        params[name] = 1 + 0.3 * r if "norm" in name else 0.4 * r if name in LAMBDAS else 0.25 * r
    return {k: v.to(DEVICE) for k, v in params.items()}


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), (
        f"{what}: max abs difference {err:.3g} from the reference"
    )


def tokens(seed: int, batch: int = 2, seq: int = 13, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def hidden(m: dict, seed: int, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randn(batch, seq, m["dim"], generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# ---- properties ----


def test_config_key():
    off = probe.build(TINY, diff=False)
    assert not [n for n in probe.param_shapes(off) if "lambda" in n or "head_norm" in n], (
        "the feature off adds parameters"
    )
    probe.build(TINY, diff=True)


def test_validation():
    probe.build(TINY, diff=True)  # the key itself is accepted (an unknown key's error would name it too)
    msg = probe.rejects({**TINY, "heads": 3})
    assert msg is not None, "an odd number of heads with differential attention on was accepted"
    assert "diff_attention" in msg and "\n" not in msg.strip(), (
        f"the error does not name diff_attention: {msg}"
    )


def test_parameters():
    for raw in PROPERTY_MODELS.values():
        base = probe.param_shapes(probe.build(raw, diff=False))
        want = dict(base)
        for i in range(raw["layers"]):
            names = probe.new_param_names(i)
            for lam in LAMBDAS:
                want[names[lam]] = (raw["nope"] + raw["rope"],)
            want[names["head_norm"]] = (2 * raw["v"],)
        got = probe.param_shapes(probe.build(raw, diff=True))
        missing = {n: s for n, s in want.items() if got.get(n) != s}
        extra = sorted(set(got) - set(want))
        assert not missing and not extra, f"parameters differ: missing or wrong {missing}, unexpected {extra}"


def test_lambda_init():
    model = probe.build({**TINY, "layers": 6}, diff=True)
    for i in range(6):
        got = probe.lambda_init(model, i)
        assert abs(got - lambda_init(i)) < 1e-6, f"layer {i}: lambda_init {got}, expected {lambda_init(i)}"


def test_init():
    model = probe.build(TINY, diff=True)
    for i in range(TINY["layers"]):
        p = probe.attention_params(model, i)
        for lam in LAMBDAS:
            std = p[lam].float().std().item()
            assert 0.03 < std < 0.3, f"layer {i} {lam} after the model's initialisation: std {std:.3g}"
        assert torch.equal(p["head_norm"].float(), torch.ones_like(p["head_norm"].float())), (
            "head_norm not ones"
        )


def test_reference():
    for name, m in PROPERTY_MODELS.items():
        model = probe.build(m, diff=True)
        for i in range(m["layers"]):
            p = canonical_params(m, seed=10 + i)
            probe.load_attention(model, i, p)
            x = hidden(m, seed=20 + i)
            with torch.no_grad():
                close(probe.attention(model, i, x), reference(p, m, x, i), f"{name} layer {i}")


def test_lambda_zero():
    """lambda = 0 leaves (1 - lambda_init) * head_norm(softmax(s q1 k1^T) v): plain attention of the first
    component, computed here with torch's own attention."""
    model = probe.build(TINY, diff=True)
    for i in range(TINY["layers"]):
        p = canonical_params(TINY, seed=30 + i)
        for lam in LAMBDAS:
            p[lam].zero_()
        p["lambda_q2"][0], p["lambda_k2"][0] = (
            math.log(1 + lambda_init(i)),
            1.0,
        )  # exp(q2.k2) = 1 + lambda_init
        probe.load_attention(model, i, p)
        x = hidden(TINY, seed=40 + i, seq=9)
        q, k, v = mla_qkv(p, TINY, x)
        values = torch.cat([v[:, 0::2], v[:, 1::2]], -1)
        plain = F.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], values, is_causal=True)
        plain = rms(plain, p["head_norm"], TINY["eps"]) * (1 - lambda_init(i))
        with torch.no_grad():
            got = probe.attention(model, i, x)
        close(got, F.linear(plain.transpose(1, 2).flatten(2), p["wo"]), f"lambda = 0, layer {i}")


def test_gradients_match_reference():
    """Gradients of a weighted sum of one layer's output w.r.t. every canonical parameter, against autograd
    through the reference."""
    for name, m in PROPERTY_MODELS.items():
        model = probe.build(m, diff=True)
        layer = m["layers"] - 1
        p = canonical_params(m, seed=50)
        probe.load_attention(model, layer, p)
        x = hidden(m, seed=51)
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(52)).to(DEVICE)
        (probe.attention(model, layer, x) * weight).sum().backward()
        got = probe.attention_grads(model, layer)
        ref = {k: v.clone().requires_grad_() for k, v in p.items()}
        (reference(ref, m, x, layer) * weight).sum().backward()
        for key, value in ref.items():
            assert got.get(key) is not None, f"{name}: no gradient for {key}"
            close(got[key], value.grad, f"{name} layer {layer}: gradient of {key}", 1e-3)


def test_causal():
    model = probe.build(TINY, diff=True)
    for i in range(TINY["layers"]):
        probe.load_attention(model, i, canonical_params(TINY, seed=60 + i))
    ids = tokens(8, seq=12)
    later = ids.clone()
    later[:, 7:] = (later[:, 7:] + 1) % TINY["vocab"]
    with torch.no_grad():
        close(
            probe.logits(model, later)[:, :7],
            probe.logits(model, ids)[:, :7],
            "logits before a changed token",
            1e-5,
        )


def test_gradients_reach_new_parameters():
    """From the model's own initialisation, the training loss gives every new parameter a finite, non-zero
    gradient (all-zero lambda vectors would give none)."""
    model = probe.build(TINY, diff=True)
    ids = tokens(9, seq=12)
    probe.loss(model, ids, ids.roll(-1, 1)).backward()
    for i in range(TINY["layers"]):
        grads = probe.attention_grads(model, i)
        for name in (*NEW, "wo"):
            g = grads.get(name)
            assert g is not None and torch.isfinite(g).all(), f"layer {i} {name}: no finite gradient"
            assert g.abs().sum() > 0, f"layer {i} {name}: zero gradient"


# ---- end to end: the feature off against the pristine framework; a training run with it on ----


def dump_pristine(out: Path) -> None:
    """Feature-off models of the pristine framework, weights moved off init: state, inputs, logits, loss, grads."""
    saved = {}
    for name, m in UNCHANGED_MODELS.items():
        model = probe.build(m, diff=None)
        probe.perturb(model, seed=1)
        ids = tokens(2)
        loss = probe.loss(model, ids, ids.roll(-1, 1))
        loss.backward()
        with torch.no_grad():
            logits = probe.logits(model, ids)
        saved[name] = {"state": probe.state(model), "ids": ids.cpu(), "logits": logits.cpu(),
                       "loss": loss.detach().cpu(), "grads": probe.grads(model)}  # fmt: skip
    torch.save(saved, out)


@pytest.mark.e2e
def test_unchanged_when_disabled():
    """The feature off (key absent) against the pristine framework's dump, made by test.sh before these tests."""
    saved = torch.load(os.environ["ATE_PRISTINE"], weights_only=False)
    for name, m in UNCHANGED_MODELS.items():
        model = probe.build(m, diff=None)  # the key absent, as in the shipped configs
        probe.load_state(model, saved[name]["state"])
        ids = saved[name]["ids"].to(DEVICE)
        loss = probe.loss(model, ids, ids.roll(-1, 1))
        loss.backward()
        with torch.no_grad():
            close(
                probe.logits(model, ids).cpu(),
                saved[name]["logits"],
                f"{name}: logits vs the pristine model",
                1e-5,
            )
        close(loss.detach().cpu(), saved[name]["loss"], f"{name}: loss vs the pristine model", 1e-5)
        grads, want = probe.grads(model), saved[name]["grads"]
        assert sorted(grads) == sorted(want), f"{name}: other parameters than the pristine model's"
        for key in want:
            close(grads[key], want[key], f"{name}: gradient of {key} vs the pristine model", 1e-4)


STEPS = getattr(probe, "STEPS", 10)  # PithTrain's run keeps its 20 steps


@pytest.mark.e2e
def test_training_run(tmp_path):
    """The workspace's own launch entry trains the tiny configuration with the feature on: every step logged,
    finite losses that decrease, and the final checkpoint holds the new parameters of every layer."""
    run = probe.train(Path(os.environ["ATE_WS"]), tmp_path / "run", STEPS)
    rows = [json.loads(x) for x in run.metrics.read_text().splitlines() if x.strip()]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1)), "metrics.jsonl lacks steps"
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses), f"non-finite loss in the run: {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    want = [probe.new_param_names(i)[n] for i in range(run.layers) for n in NEW]
    missing = [k for k in want if k not in run.checkpoint_keys]
    assert not missing, f"the run's checkpoint lacks {missing[:5]}"


if __name__ == "__main__" and sys.argv[1:2] == ["pristine"]:
    check_imported_from(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    dump_pristine(Path(sys.argv[2]))
