"""Property checks of `model.diff_attention` in PithTrain's DeepSeek-V2, against a reference written here.

    python props.py pristine <baseline root> <out.pt>                 (PYTHONPATH = the pristine framework)
    python props.py agent <workspace> <pristine.pt> <run dir> <out.json>   (PYTHONPATH = the agent's workspace)

`pristine` saves weights, inputs and logits of the unmodified model; `agent` checks the agent's code: every
property is one function here, run in isolation, and the JSON says which passed and why others failed. The
reference recomputes MLA's q, k, v from the layer's weights (plain RoPE: property models use
rope_scaling_type = "none"), then the differential attention of Ye et al. 2024 as the instruction defines it.
"""

import copy
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = {  # small enough for exact checks in milliseconds; v_head_dim != qk_head_dim on purpose
    "family": "deepseek_v2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 0,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
    "first_k_dense_replace": 1, "n_shared_experts": 1, "rope_scaling_type": "none",
    "max_position_embeddings": 64, "router": {"num_experts": 4, "top_k": 2},
}  # fmt: skip
PROPERTY_MODELS = {
    "mha4": TINY,
    "qlora6": {**TINY, "num_attention_heads": 6, "q_lora_rank": 8, "num_hidden_layers": 2, "v_head_dim": 10},
}
UNCHANGED_MODELS = {  # the disabled path must reproduce the pristine model exactly, YaRN included
    "tiny_yarn": {**TINY, "rope_scaling_type": "yarn", "rope_factor": 4.0, "original_max_position_embeddings": 16},
    "qlora_grouped": {**TINY, "q_lora_rank": 8, "router": {"num_experts": 4, "top_k": 2, "n_group": 2,
                                                           "topk_group": 1}},
}  # fmt: skip
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def build(model_raw: dict, seq_len: int = 16):
    from pithtrain.config import build_config, model_classes

    cfg = build_config({"model": copy.deepcopy(model_raw), "train": {"seq_len": seq_len}})
    return cfg, model_classes(cfg.family)[1](cfg.model)


def tokens(seed: int, batch: int = 2, seq: int = 13, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- pristine side ----


def pristine(out: Path) -> None:
    saved = {}
    for name, raw in UNCHANGED_MODELS.items():
        torch.manual_seed(1)
        _, model = build(raw)
        model.init_weights()
        with torch.no_grad():
            for p in model.parameters():  # beyond init: make every weight matter
                p.add_(0.05 * torch.randn_like(p))
        ids = tokens(2)
        with torch.no_grad():
            res = model(ids, labels=ids.roll(-1, 1))
        saved[name] = {"state": model.state_dict(), "ids": ids, "logits": res.logits, "loss": res.loss}
    torch.save(saved, out)


# ---- the reference ----


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, S, heads, d]: rotate pairs (x[2i], x[2i+1]) by position * theta^(-2i/d)."""
    seq, d = x.shape[1], x.shape[-1]
    angle = torch.arange(seq, dtype=torch.float32)[:, None] * theta ** (-torch.arange(0, d, 2) / d)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def mla_qkv(attn, m, x: torch.Tensor):
    """q, k [B, H, S, qk_head_dim], v [B, H, S, v_head_dim] from the layer's own weights (plain RoPE)."""
    batch, seq, _ = x.shape
    heads, nope, rope = m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim
    if m.q_lora_rank:
        q = F.linear(
            rms(F.linear(x, attn.q_a_proj.weight), attn.q_a_layernorm.weight, 1e-6), attn.q_b_proj.weight
        )
    else:
        q = F.linear(x, attn.q_proj.weight)
    q = q.view(batch, seq, heads, nope + rope)
    latent, k_rope = F.linear(x, attn.kv_a_proj_with_mqa.weight).split([m.kv_lora_rank, rope], -1)
    kv = F.linear(rms(latent, attn.kv_a_layernorm.weight, 1e-6), attn.kv_b_proj.weight)
    k_nope, v = kv.view(batch, seq, heads, nope + m.v_head_dim).split([nope, m.v_head_dim], -1)
    k_rope = rope_interleaved(k_rope[:, :, None], m.rope_theta).expand(-1, -1, heads, -1)
    q = torch.cat([q[..., :nope], rope_interleaved(q[..., nope:], m.rope_theta)], -1)
    k = torch.cat([k_nope, k_rope], -1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def softmax_causal(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    seq = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), -math.inf).softmax(-1)


def lambda_init(layer_idx: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def reference_diff(attn, m, x: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """The differential attention layer's output [B, S, hidden] for input x, from attn's parameters."""
    q, k, v = mla_qkv(attn, m, x)
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    a1 = softmax_causal(q[:, 0::2], k[:, 0::2], scale)
    a2 = softmax_causal(q[:, 1::2], k[:, 1::2], scale)
    lam0 = lambda_init(layer_idx)
    lam = torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2) + lam0
    values = torch.cat([v[:, 0::2], v[:, 1::2]], -1)  # head j: values of heads 2j, 2j+1 side by side
    out = rms((a1 - lam * a2) @ values, attn.head_norm.weight, m.rms_norm_eps) * (1 - lam0)
    return F.linear(out.transpose(1, 2).flatten(2), attn.o_proj.weight)


# ---- agent side: one function per property; each raises AssertionError with the reason ----


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), (
        f"{what}: max abs difference {err:.3g} from the reference"
    )


def randomise(model, seed: int) -> None:
    """Weights far from init (lambda vectors and head_norm too), so every term of the formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif any(name.endswith(lam) for lam in LAMBDAS):
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def layer_io(model, ids: torch.Tensor) -> list:
    """[(layer index, attention module, its input, its output)] of one forward through the whole model."""
    seen = []
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=int(i): seen.append((i, mod, args[0].detach(), out.detach()))
        )
        for i, layer in model.layers.items()
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(model.layers), f"{len(seen)} attention calls for {len(model.layers)} layers"
    return seen


def p_config_key(ctx):
    cfg, _ = build(TINY)
    assert getattr(cfg.model, "diff_attention", None) is False, "model.diff_attention must default to false"
    cfg, _ = build({**TINY, "diff_attention": True})
    assert cfg.model.diff_attention is True
    _, off = build({**TINY, "diff_attention": False})
    assert not [n for n, _ in off.named_parameters() if "lambda" in n], (
        "diff_attention = false adds parameters"
    )


def p_validation(ctx):
    from pithtrain.config import ConfigError

    build({**TINY, "diff_attention": True})  # the key itself is accepted
    try:
        build({**TINY, "num_attention_heads": 3, "diff_attention": True})
    except ConfigError as e:
        msg = str(e)
        assert "diff_attention" in msg and "\n" not in msg.strip(), (
            f"error does not name model.diff_attention: {msg}"
        )
        return
    raise AssertionError("an odd model.num_attention_heads with diff_attention = true was accepted")


def p_parameters(ctx):
    for raw in PROPERTY_MODELS.values():
        _, on = build({**raw, "diff_attention": True})
        _, off = build(raw)
        m = on.cfg
        base = {n: tuple(p.shape) for n, p in off.named_parameters()}
        want = dict(base)
        for i in range(m.num_hidden_layers):
            for lam in LAMBDAS:
                want[f"layers.{i}.self_attn.{lam}"] = (m.qk_nope_head_dim + m.qk_rope_head_dim,)
            want[f"layers.{i}.self_attn.head_norm.weight"] = (2 * m.v_head_dim,)
        got = {n: tuple(p.shape) for n, p in on.named_parameters()}
        missing = {n: s for n, s in want.items() if got.get(n) != s}
        extra = sorted(set(got) - set(want))
        assert not missing and not extra, f"parameters differ: missing or wrong {missing}, unexpected {extra}"


def p_lambda_init(ctx):
    _, model = build({**TINY, "num_hidden_layers": 6, "diff_attention": True})
    for i, layer in model.layers.items():
        got = float(layer.self_attn.lambda_init)
        want = lambda_init(int(i))
        assert abs(got - want) < 1e-6, f"layer {i}: lambda_init {got}, expected {want}"


def p_init(ctx):
    _, model = build({**TINY, "diff_attention": True})
    torch.manual_seed(0)
    model.init_weights()
    for i, layer in model.layers.items():
        a = layer.self_attn
        for lam in LAMBDAS:
            p = getattr(a, lam).detach()
            assert 0.03 < p.std().item() < 0.3, (
                f"layer {i} {lam} after init_weights: std {p.std().item():.3g}"
            )
        assert torch.equal(a.head_norm.weight.detach(), torch.ones_like(a.head_norm.weight)), (
            "head_norm not ones"
        )


def p_reference(ctx):
    for name, raw in PROPERTY_MODELS.items():
        _, model = build({**raw, "diff_attention": True})
        randomise(model, seed=3)
        for i, attn, x, out in layer_io(model, tokens(4, seq=11)):
            with torch.no_grad():
                close(out, reference_diff(attn, model.cfg, x, i), f"{name} layer {i}")


def p_lambda_zero(ctx):
    """lambda = 0 leaves (1 - lambda_init) * head_norm(softmax(s q1 k1^T) v): plain attention of the first
    component, computed here with torch's own attention."""
    _, model = build({**TINY, "diff_attention": True})
    randomise(model, seed=5)
    m = model.cfg
    with torch.no_grad():
        for i, layer in model.layers.items():
            a, lam0 = layer.self_attn, lambda_init(int(i))
            a.lambda_q1.zero_(), a.lambda_k1.zero_(), a.lambda_q2.zero_(), a.lambda_k2.zero_()
            a.lambda_q2[0], a.lambda_k2[0] = math.log(1 + lam0), 1.0  # exp(q2.k2) = 1 + lambda_init
    for i, attn, x, out in layer_io(model, tokens(6, seq=9)):
        with torch.no_grad():
            q, k, v = mla_qkv(attn, m, x)
            values = torch.cat([v[:, 0::2], v[:, 1::2]], -1)
            plain = F.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], values, is_causal=True)
            plain = rms(plain, attn.head_norm.weight, m.rms_norm_eps) * (1 - lambda_init(i))
            close(
                out, F.linear(plain.transpose(1, 2).flatten(2), attn.o_proj.weight), f"lambda = 0, layer {i}"
            )


def p_causal(ctx):
    _, model = build({**TINY, "diff_attention": True})
    randomise(model, seed=7)
    ids = tokens(8, seq=12)
    later = ids.clone()
    later[:, 7:] = (later[:, 7:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        close(model(later).logits[:, :7], model(ids).logits[:, :7], "logits before a changed token", 1e-5)


def p_gradients(ctx):
    _, model = build({**TINY, "diff_attention": True})
    torch.manual_seed(0)
    model.init_weights()
    ids = tokens(9, seq=12)
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    for i, layer in model.layers.items():
        for name in (*LAMBDAS, "head_norm.weight", "o_proj.weight"):
            p = layer.self_attn.get_parameter(name)
            assert p.grad is not None and torch.isfinite(p.grad).all(), (
                f"layer {i} {name}: no finite gradient"
            )
            assert p.grad.abs().sum() > 0, f"layer {i} {name}: zero gradient"


def p_unchanged_when_disabled(ctx):
    saved = torch.load(ctx["pristine"], weights_only=True)
    for name, raw in UNCHANGED_MODELS.items():
        _, model = build(raw)
        model.load_state_dict(saved[name]["state"], strict=True)
        with torch.no_grad():
            res = model(saved[name]["ids"], labels=saved[name]["ids"].roll(-1, 1))
        close(res.logits, saved[name]["logits"], f"{name}: logits vs the pristine model", 1e-5)
        close(res.loss, saved[name]["loss"], f"{name}: loss vs the pristine model", 1e-5)


def p_run(ctx):
    """The training run with the key on (launched by feature_props.py): finite, decreasing logged losses; its final
    checkpoint, rebuilt from its config.json, has the lambda vectors and beats the initial model's held-out loss."""
    from pithtrain import checkpoint as ckpt
    from pithtrain.config import build_config, model_classes
    from pithtrain.data import TokenShards, builtin_dataset

    run = Path(ctx["run"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [float(r["loss"]) for r in rows]
    ctx["sub"]["run_losses"] = [round(x, 4) for x in losses]
    assert [int(r["step"]) for r in rows] == list(range(1, ctx["steps"] + 1)), "metrics.jsonl lacks steps"
    ctx["sub"]["run_finite"] = all(math.isfinite(x) for x in losses)
    assert ctx["sub"]["run_finite"], "non-finite loss in the run"
    raw = json.loads((run / "config.json").read_text())
    raw.pop("source", None)
    assert raw["model"].get("diff_attention") is True, (
        "the run's config.json does not have diff_attention = true"
    )
    cfg = build_config(raw)
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    model.eval()
    x, y = TokenShards(builtin_dataset()).batch(range(8), cfg.train.seq_len, "val")
    with torch.no_grad():
        before = model(x, labels=y).loss.item()
        ckpt.load_model_weights(ckpt.latest_checkpoint(run), model)
        after = model(x, labels=y).loss.item()
    assert any(model.layers["0"].self_attn.get_parameter(lam).ne(0).any() for lam in LAMBDAS)
    ctx["sub"]["heldout_loss"] = [round(before, 4), round(after, 4)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ctx["sub"]["run_decreasing"] = last < first - 0.3 and math.isfinite(after) and after < before - 0.3
    assert ctx["sub"]["run_decreasing"], (
        f"loss did not decrease: logged {first:.3f} -> {last:.3f}, held-out {before:.3f} -> {after:.3f}"
    )


PROPERTIES = [
    p_config_key,
    p_validation,
    p_parameters,
    p_lambda_init,
    p_init,
    p_reference,
    p_lambda_zero,
    p_causal,
    p_gradients,
]


def agent(ws: str, pristine_pt: str, run: str, steps: int, out: Path) -> None:
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != Path(ws).resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {ws}")
    sub = {"run_finite": False, "run_decreasing": False}
    ctx = {"pristine": pristine_pt, "run": run, "steps": steps, "sub": sub}
    results = {}
    for fn in [*PROPERTIES, p_unchanged_when_disabled, p_run]:
        try:
            fn(ctx)
            results[fn.__name__[2:]] = ""
        except Exception as e:  # the agent's code failed the property (or crashed in it)
            results[fn.__name__[2:]] = f"{type(e).__name__}: {e}".strip()[:240]
            traceback.print_exc()
    out.write_text(json.dumps({"results": results, "sub": sub}, indent=1) + "\n")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "pristine":
        import pithtrain

        if Path(pithtrain.__file__).resolve().parent.parent != Path(sys.argv[2]).resolve():
            raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {sys.argv[2]}")
        pristine(Path(sys.argv[3]))
    else:
        agent(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), Path(sys.argv[6]))
