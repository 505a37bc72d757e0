"""PithTrain probe of the MoBA tests (../test_moba.py): the agent's DeepSeek-V2 (model.moba_block_size /
model.moba_topk) at the tests' tiny shapes, answering in the tests' canonical terms.

    python probe.py pristine <pristine framework root> <out.pt>     (PYTHONPATH = the pristine framework)

Canonical spec -> the [model] table of PithTrain's config (MoE from the second layer, plain RoPE). The core slot is
the attention's call of torch.nn.functional.scaled_dot_product_attention (q, k, v [B, H, S, d], scale=), replaced for
the forward of a model with MoBA off.
"""

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

DEVICE = "cpu"  # PithTrain's task runs on CPU (task.toml gpus = 0)
KEY_PREFIX = "model."  # the config errors name the key as model.<key>
RUN = {
    "steps": 20,
    "window": 3,
    "drop": 0.3,
}  # the training run: steps, and the drop of the mean loss of its ends

UNCHANGED_MODELS = {  # the disabled path must reproduce the pristine model exactly, YaRN included
    "tiny_yarn": {"rope_scaling_type": "yarn", "rope_factor": 4.0, "original_max_position_embeddings": 16},
    "qlora_grouped": {
        "q_lora_rank": 8,
        "router": {"num_experts": 4, "top_k": 2, "n_group": 2, "topk_group": 1},
    },
}


def model_raw(spec: dict, moba=None) -> dict:
    raw = {
        "family": "deepseek_v2", "vocab_size": spec["vocab"], "hidden_size": spec["hidden"], "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": spec["layers"], "num_attention_heads": spec["heads"],
        "q_lora_rank": spec["q_lora_rank"], "kv_lora_rank": spec["kv_lora_rank"], "qk_nope_head_dim": spec["qk_nope"],
        "qk_rope_head_dim": spec["qk_rope"], "v_head_dim": spec["v_head_dim"], "first_k_dense_replace": 1,
        "n_shared_experts": 1, "rope_scaling_type": "none", "max_position_embeddings": spec["max_seq"],
        "router": {"num_experts": 4, "top_k": 2},
    }  # fmt: skip
    return raw if moba is None else {**raw, "moba_block_size": moba[0], "moba_topk": moba[1]}


TINY = {"vocab": 128, "hidden": 32, "layers": 3, "heads": 4, "q_lora_rank": 0, "kv_lora_rank": 16, "qk_nope": 8,
        "qk_rope": 4, "v_head_dim": 6, "max_seq": 64}  # fmt: skip


def build(raw: dict, seq_len: int = 32):
    from pithtrain.config import build_config, model_classes

    cfg = build_config({"model": copy.deepcopy(raw), "train": {"seq_len": seq_len}})
    return cfg, model_classes(cfg.family)[1](cfg.model)


def defaults() -> tuple:
    cfg, _ = build(model_raw(TINY))
    return getattr(cfg.model, "moba_block_size", None), getattr(cfg.model, "moba_topk", None)


def config_error(values: dict) -> str | None:
    from pithtrain.config import ConfigError

    try:
        cfg, _ = build({**model_raw(TINY), **values})
    except ConfigError as e:
        return str(e)
    got = {k: getattr(cfg.model, k, None) for k in values}
    return None if got == values else f"the config has {got} for {values}"


def parameter_shapes(spec: dict, moba) -> dict:
    _, model = build(model_raw(spec, moba))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@contextlib.contextmanager
def core_attention(core):
    """F.scaled_dot_product_attention -> core(q, k, v, scale) while in force (the attention's causal call)."""
    sdpa = F.scaled_dot_product_attention

    def replaced(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert attn_mask is None and is_causal, "MoBA off: the attention call is not the causal one"
        return core(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)

    F.scaled_dot_product_attention = replaced
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def forward(spec: dict, moba, ids, init, core=None, grad: bool = False):
    """-> (logits [B, S, vocab] float64, {parameter: gradient of the mean next-token loss} or None) of the model with
    MoBA `moba` = (block, top-k) or None (the default: off); `core(q, k, v, scale)` replaces every layer's core
    attention."""
    _, model = build(model_raw(spec, moba))
    init(model.named_parameters())
    with core_attention(core) if core else contextlib.nullcontext(), torch.set_grad_enabled(grad):
        logits = model(ids).logits
    grads = None
    if grad:
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().double(), grads


# ---- the pristine comparison ----


def unchanged_raw(name: str) -> dict:
    raw = model_raw(TINY)
    return {**raw, **UNCHANGED_MODELS[name]}


def pristine(base: Path, out: Path) -> None:
    import pithtrain

    if Path(pithtrain.__file__).resolve().parent.parent != base.resolve():
        raise ImportError(f"pithtrain was imported from {pithtrain.__file__}, not from {base}")
    saved = {}
    for name in UNCHANGED_MODELS:
        torch.manual_seed(1)
        _, model = build(unchanged_raw(name))
        model.init_weights()
        with torch.no_grad():
            for p in model.parameters():  # beyond init: make every weight matter
                p.add_(0.05 * torch.randn_like(p))
        ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            res = model(ids, labels=ids.roll(-1, 1))
        saved[name] = {"state": model.state_dict(), "ids": ids, "logits": res.logits, "loss": res.loss}
    torch.save(saved, out)


def unchanged(base: Path, saved: Path) -> list:
    """[(what, the agent's output, the pristine's)] with MoBA off."""
    ref, out = torch.load(saved, weights_only=True), []
    for name, want in ref.items():
        _, model = build(unchanged_raw(name))
        model.load_state_dict(want["state"], strict=True)
        with torch.no_grad():
            res = model(want["ids"], labels=want["ids"].roll(-1, 1))
        out += [(f"{name}: logits", res.logits, want["logits"]), (f"{name}: loss", res.loss, want["loss"])]
    return out


# ---- the training run ----


def train(ws: Path, base: Path, run: Path, moba: tuple, steps: int) -> tuple[list, tuple]:
    """`python -m pithtrain.train` of the agent's workspace on the pristine tiny config with MoBA on; its final
    checkpoint, rebuilt from its config.json, must beat the initial model's held-out loss by 0.3.
    -> (metrics.jsonl rows, the run config's MoBA keys)."""
    sets = {"model.moba_block_size": moba[0], "model.moba_topk": moba[1], "train.steps": steps, "train.seq_len": 64,
            "train.micro_batch_size": 4, "train.log_every": 5, "train.eval_batches": 1, "train.device": "cpu",
            "checkpoint.every": 0, "train.run_dir": run}  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "pithtrain.train",
        "--config",
        str(base / "configs" / "tiny-deepseek-v2-lite.toml"),
    ]
    cmd += [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    run.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, cwd=run.parent, env={**os.environ, "PYTHONPATH": str(ws)}, capture_output=True,
                       text=True, timeout=400)  # fmt: skip
    assert r.returncode == 0, f"the run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    rows = fp.rows(run / "metrics.jsonl")
    raw = json.loads((run / "config.json").read_text())
    raw.pop("source", None)
    got = (raw["model"].get("moba_block_size"), raw["model"].get("moba_topk"))
    if got == tuple(moba):
        _, before, after, _ = fp.pithtrain_heldout(raw, run)
        assert math.isfinite(after) and after < before - 0.3, f"held-out loss {before:.3f} -> {after:.3f}"
    return rows, got


if __name__ == "__main__":
    pristine(Path(sys.argv[2]), Path(sys.argv[3]))
