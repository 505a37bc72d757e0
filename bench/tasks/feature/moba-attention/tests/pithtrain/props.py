"""Property checks of MoBA (`model.moba_block_size`, `model.moba_topk`) in PithTrain's DeepSeek-V2.

    python props.py pristine <baseline root> <out.pt>                 (PYTHONPATH = the pristine framework)
    python props.py agent <workspace> <pristine.pt> <run dir> <steps> <out.json>   (PYTHONPATH = the workspace)

`pristine` saves weights, inputs and logits of the unmodified model; `agent` checks the agent's code: every
property is one function here, run in isolation, and the JSON says which passed and why others failed. The
reference recomputes MLA's q, k, v from the layer's weights (plain RoPE: property models use
rope_scaling_type = "none"), then Mixture of Block Attention (Lu et al. 2025) as the instruction defines it,
one query at a time. Inputs whose block choice is a near tie are skipped for another seed.
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
QLORA = {**TINY, "num_attention_heads": 3, "q_lora_rank": 8, "num_hidden_layers": 2, "v_head_dim": 10}
UNCHANGED_MODELS = {  # the disabled path must reproduce the pristine model exactly, YaRN included
    "tiny_yarn": {**TINY, "rope_scaling_type": "yarn", "rope_factor": 4.0, "original_max_position_embeddings": 16},
    "qlora_grouped": {**TINY, "q_lora_rank": 8, "router": {"num_experts": 4, "top_k": 2, "n_group": 2,
                                                           "topk_group": 1}},
}  # fmt: skip
CASES = [  # (model, seq, block size, top-k): ragged last blocks, top-k below/above the block count
    ("mha4", TINY, 23, 4, 2), ("mha4", TINY, 24, 4, 3), ("mha4", TINY, 30, 3, 4),
    ("qlora3", QLORA, 17, 5, 2), ("qlora3", QLORA, 26, 2, 6),
]  # fmt: skip


def build(model_raw: dict, seq_len: int = 32):
    from pithtrain.config import build_config, model_classes

    cfg = build_config({"model": copy.deepcopy(model_raw), "train": {"seq_len": seq_len}})
    return cfg, model_classes(cfg.family)[1](cfg.model)


def moba(raw: dict, block: int, topk: int) -> dict:
    return {**raw, "moba_block_size": block, "moba_topk": topk}


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


def moba_mask(q: torch.Tensor, k: torch.Tensor, block: int, topk: int) -> tuple[torch.Tensor, float]:
    """-> (allowed [B, H, S, S], the smallest gap between a kept and a dropped earlier block's gate score)."""
    batch, heads, seq, _ = q.shape
    allowed = torch.zeros(batch, heads, seq, seq, dtype=torch.bool)
    gap = math.inf
    for b in range(batch):
        for h in range(heads):
            means = [k[b, h, j : j + block].mean(0) for j in range(0, seq, block)]
            for t in range(seq):
                own = t // block
                gate = sorted(((float(q[b, h, t] @ means[j]), j) for j in range(own)), reverse=True)
                if 0 < topk - 1 < own:
                    gap = min(gap, gate[topk - 2][0] - gate[topk - 1][0])
                for j in [own, *(j for _, j in gate[: topk - 1])]:
                    allowed[b, h, t, j * block : min(j * block + block, t + 1)] = True
    return allowed, gap


def attend(q, k, v, allowed, scale: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    return scores.softmax(-1) @ v


def reference_moba(attn, m, x: torch.Tensor, block: int, topk: int) -> tuple[torch.Tensor, float]:
    """The MoBA layer's output [B, S, hidden] for input x from attn's weights, and the gate's tie gap."""
    q, k, v = mla_qkv(attn, m, x)
    allowed, gap = moba_mask(q, k, block, topk)
    out = attend(q, k, v, allowed, (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5)
    return F.linear(out.transpose(1, 2).flatten(2), attn.o_proj.weight), gap


def fixed_mask_output(attn, m, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    q, k, v = mla_qkv(attn, m, x)
    out = attend(q, k, v, allowed, (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5)
    return F.linear(out.transpose(1, 2).flatten(2), attn.o_proj.weight)


# ---- agent side: one function per property; each raises AssertionError with the reason ----


class VerifierFault(Exception):
    """A problem of this script, not of the agent's code: exit 3, which feature_props.py reports as a verifier error."""


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= tol * (1 + want.abs().max().item()), (
        f"{what}: max abs difference {err:.3g} from the reference"
    )


def randomise(model, seed: int) -> None:
    """Weights far from init, so attention is peaked and block choices matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
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


def p_config_keys(ctx):
    cfg, _ = build(TINY)
    got = (getattr(cfg.model, "moba_block_size", None), getattr(cfg.model, "moba_topk", None))
    assert got == (0, 3), f"defaults (moba_block_size, moba_topk) = {got}, expected (0, 3)"
    cfg, _ = build(moba(TINY, 4, 2))
    assert (cfg.model.moba_block_size, cfg.model.moba_topk) == (4, 2)


def p_validation(ctx):
    from pithtrain.config import ConfigError

    build(moba(TINY, 4, 1))  # the keys themselves are accepted
    for key, raw in (("moba_block_size", moba(TINY, -1, 2)), ("moba_topk", moba(TINY, 4, 0))):
        try:
            build(raw)
        except ConfigError as e:
            msg = str(e)
            assert f"model.{key}" in msg and "\n" not in msg.strip(), (
                f"error does not name model.{key}: {msg}"
            )
            continue
        raise AssertionError(f"model.{key} = {raw[key]} was accepted")


def p_no_new_parameters(ctx):
    for raw in (TINY, QLORA):
        _, on = build(moba(raw, 4, 2))
        _, off = build(raw)
        got = {n: tuple(p.shape) for n, p in on.named_parameters()}
        want = {n: tuple(p.shape) for n, p in off.named_parameters()}
        assert got == want, f"parameters differ with MoBA on: {sorted(set(got) ^ set(want))[:6]}"


def p_reference(ctx):
    for name, raw, seq, block, topk in CASES:
        for seed in range(10, 20):  # skip inputs whose block choice is a near tie (rounding could flip it)
            _, model = build(moba(raw, block, topk))
            randomise(model, seed)
            io = layer_io(model, tokens(seed, seq=seq))
            with torch.no_grad():
                refs = [reference_moba(attn, model.cfg, x, block, topk) for _, attn, x, _ in io]
            if min(gap for _, gap in refs) > 1e-3:
                break
        else:
            raise VerifierFault(f"{name}: no seed without near ties")
        for (i, _, _, out), (ref, _) in zip(io, refs, strict=True):
            close(out, ref, f"{name} seq {seq} block {block} top-k {topk}: layer {i}")


def p_topk_covers_all_is_causal(ctx):
    """top-k >= the number of blocks (and a block longer than the sequence): dense causal attention."""
    ids = tokens(21, seq=20)
    _, dense = build(TINY)
    randomise(dense, 22)
    with torch.no_grad():
        want = dense(ids).logits
    for block, topk in ((4, 5), (4, 50), (3, 7), (32, 1)):
        _, model = build(moba(TINY, block, topk))
        model.load_state_dict(dense.state_dict())
        with torch.no_grad():
            close(model(ids).logits, want, f"block {block} top-k {topk} vs causal attention", 1e-5)


def p_topk_one_is_own_block(ctx):
    """top-k = 1: each query sees only the earlier positions of its own block."""
    seq, block = 19, 4
    pos = torch.arange(seq)
    allowed = (pos[:, None] // block == pos // block) & (pos <= pos[:, None])
    _, model = build(moba(TINY, block, 1))
    randomise(model, 23)
    for i, attn, x, out in layer_io(model, tokens(24, seq=seq)):
        with torch.no_grad():
            close(out, fixed_mask_output(attn, model.cfg, x, allowed), f"top-k 1, layer {i}")


def p_causal(ctx):
    _, model = build(moba(TINY, 4, 2))
    randomise(model, 25)
    ids = tokens(26, seq=24)
    later = ids.clone()
    later[:, 13:] = (later[:, 13:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        close(model(later).logits[:, :13], model(ids).logits[:, :13], "logits before a changed token", 1e-5)


def p_gradients(ctx):
    _, model = build(moba(TINY, 4, 2))
    torch.manual_seed(0)
    model.init_weights()
    ids = tokens(27, seq=22)
    model(ids, labels=ids.roll(-1, 1)).loss.backward()
    for i, layer in model.layers.items():
        for name in ("q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "o_proj.weight"):
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
    """The training run with MoBA on (launched by feature_props.py): finite, decreasing logged losses; its final
    checkpoint, rebuilt from its config.json, beats the initial model's held-out loss."""
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
    got = (raw["model"].get("moba_block_size"), raw["model"].get("moba_topk"))
    assert got == (16, 2), f"the run's config.json has (moba_block_size, moba_topk) = {got}, expected (16, 2)"
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
    ctx["sub"]["heldout_loss"] = [round(before, 4), round(after, 4)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ctx["sub"]["run_decreasing"] = last < first - 0.3 and math.isfinite(after) and after < before - 0.3
    assert ctx["sub"]["run_decreasing"], (
        f"loss did not decrease: logged {first:.3f} -> {last:.3f}, held-out {before:.3f} -> {after:.3f}"
    )


PROPERTIES = [p_config_keys, p_validation, p_no_new_parameters, p_reference, p_topk_covers_all_is_causal,
              p_topk_one_is_own_block, p_causal, p_gradients]  # fmt: skip


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
        except VerifierFault as e:
            print(f"verifier fault: {e}", file=sys.stderr)
            sys.exit(3)
        except Exception as e:  # the agent's code failed the property (or crashed in it)
            results[fn.__name__[2:]] = f"{type(e).__name__}: {e}".strip()[:240]
            traceback.print_exc()
    out.write_text(json.dumps({"results": results, "sub": sub}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "pristine":
        import pithtrain

        if Path(pithtrain.__file__).resolve().parent.parent != Path(sys.argv[2]).resolve():
            raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {sys.argv[2]}")
        pristine(Path(sys.argv[3]))
    else:
        agent(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), Path(sys.argv[6]))
