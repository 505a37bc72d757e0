"""Megatron-Core probe of the differential-attention tests: the workspace's GPTModel (through its launch entry
ate_run/pretrain_gpt.py: local spec, MLA, MoE) at the canonical shapes, fp32, in canonical terms.

Canonical -> Megatron, in decoder.layers.{i}.self_attention: wq -> linear_q_proj (wq_a, q_norm, wq_b ->
linear_q_down_proj, q_layernorm, linear_q_up_proj), wkv_a -> linear_kv_down_proj, kv_norm -> kv_layernorm,
wkv_b -> linear_kv_up_proj, wo -> linear_proj, lambda_* -> lambda_*, head_norm -> head_norm.weight. Megatron's
layer_number is 1-based; canonical layer i is decoder.layers[i]. Megatron's MLA rotates the rope features as
[evens | odds] of the canonical pairs: the same scores.
"""

import json
import os
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # canonical_attention.py; feature_probe.py (verify_lib)
import canonical_attention as ca  # noqa: E402
import feature_probe as fp  # noqa: E402
from canonical_attention import grads, param_shapes, perturb  # noqa: E402, F401  (the probe's)

DEVICE = fp.DEVICE
PACKAGE = "megatron.core"  # must be imported from the workspace (or the pristine copy)
CANONICAL = {"wq": "linear_q_proj.weight", "wq_a": "linear_q_down_proj.weight", "q_norm": "q_layernorm.weight",
             "wq_b": "linear_q_up_proj.weight", "wkv_a": "linear_kv_down_proj.weight",
             "kv_norm": "kv_layernorm.weight", "wkv_b": "linear_kv_up_proj.weight", "wo": "linear_proj.weight",
             "lambda_q1": "lambda_q1", "lambda_k1": "lambda_k1", "lambda_q2": "lambda_q2", "lambda_k2": "lambda_k2",
             "head_norm": "head_norm.weight"}  # fmt: skip


def pretrain_gpt():
    import ate_run.pretrain_gpt as pg

    return pg


def config(m: dict, diff) -> dict:
    """The launch entry's resolved config for canonical shapes m: fp32, plain RoPE (or YaRN) and scale 1/sqrt(d)."""
    model = dict(
        multi_latent_attention=True, num_layers=m["layers"], hidden_size=m["dim"], num_attention_heads=m["heads"],
        ffn_hidden_size=m["inter"], normalization="RMSNorm", layernorm_epsilon=m["eps"], gated_linear_unit=True,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        qk_layernorm=True, q_lora_rank=m["q_lora_rank"], kv_lora_rank=m["kv_lora_rank"], qk_head_dim=m["nope"],
        qk_pos_emb_head_dim=m["rope"], v_head_dim=m["v"], kv_channels=m["v"], rope_type="rope",
        rotary_base=m["theta"], rotary_scaling_factor=1.0,
        moe_layer_freq=[0] * m["dense_layers"] + [1] * (m["layers"] - m["dense_layers"]),
        num_moe_experts=m["experts"], moe_ffn_hidden_size=m["moe_inter"],
        moe_shared_expert_intermediate_size=m["shared"] * m["moe_inter"], moe_router_topk=m["top_k"],
        moe_router_score_function="softmax", moe_router_pre_softmax=True, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01, moe_router_dtype="fp32", moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False, bf16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False,
    )  # fmt: skip
    if m["yarn"]:
        factor, original = m["yarn"]
        model.update(rope_type="yarn", rotary_scaling_factor=factor, original_max_position_embeddings=original,
                     beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)  # fmt: skip
    if m.get("groups"):
        model.update(moe_router_num_groups=m["groups"][0], moe_router_group_topk=m["groups"][1])
    if diff is not None:
        model["diff_attention"] = diff
    gpt = {
        "vocab_size": m["vocab"],
        "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": False,
    }
    return {"model": model, "gpt": gpt, "train": {"seed": 0, "seq_length": m["seq"]}, "device": DEVICE}


def build(m: dict, diff):
    """The GPTModel, initialised by Megatron (seed 0); diff None leaves the key out (the pristine framework)."""
    return pretrain_gpt().build_model(config(m, diff), DEVICE).to(DEVICE)


def rejects(m: dict) -> str | None:
    """The error of building the config with the feature on, as the launch entry's load_config does; None: accepted."""
    try:
        pretrain_gpt().model_config(config(m, True), "meta")
    except Exception as e:  # any construction error is the rejection
        return f"{type(e).__name__}: {e}"
    return None


def attn(model, i: int):
    return model.decoder.layers[i].self_attention


new_param_names, lambda_init, attention_params, load_attention, attention_grads = ca.views(
    CANONICAL, attn, "decoder.layers.{}.self_attention")  # the canonical terms, as the other probes give them


def attention(model, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's self_attention on x [B, S, D] (Megatron's [S, B, D] inside) -> [B, S, D]."""
    a = attn(model, i)
    a.zero_grad(set_to_none=True)
    out, bias = a(x.transpose(0, 1).contiguous(), None)
    out = out if bias is None else out + bias
    return out.transpose(0, 1)


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, _positions(ids), None)


def loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return model(ids, _positions(ids), None, labels=labels).float().mean()


def state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def load_state(model, saved: dict) -> None:
    own = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert own == set(saved), (
        f"state-dict keys differ from the pristine model's: {sorted(own ^ set(saved))[:6]}"
    )
    model.load_state_dict(saved, strict=False)


def train(ws: Path, run: Path, steps: int) -> SimpleNamespace:
    """The pristine tiny config with [model] diff_attention = true, at the verifier's smaller batch (4 x 64 tokens,
    as PithTrain's verifier runs), trained by the workspace's launch entry. On the CPU without Megatron's
    torch.compile'd fusions (seconds of compiling there). -> metrics path, layers, the final checkpoint's keys."""
    raw = tomllib.loads((Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml").read_text())
    raw["model"]["diff_attention"] = True
    if DEVICE == "cpu":
        raw["model"].update(bias_activation_fusion=False, bias_dropout_fusion=False)
    raw["train"].update(micro_batch_size=4, global_batch_size=4, seq_length=64)
    run.parent.mkdir(parents=True, exist_ok=True)
    cfg = fp.write_toml(raw, run.parent / "tiny-diff.toml")
    try:  # the launch entry's own config check, here: a rejected config needs no training process
        pretrain_gpt().load_config(cfg)
    except Exception as e:
        raise AssertionError(f"the launch entry rejects the config with diff_attention = true: {e}") from None
    r = fp.megatron_train(ws, cfg, run, steps, timeout=300)
    assert r.returncode == 0, f"the training run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    assert json.loads((run / "config.json").read_text())["model"].get("diff_attention") is True, (
        "the run's config.json lacks model.diff_attention = true"
    )
    from torch.distributed.checkpoint import FileSystemReader

    path = run / "checkpoints" / f"iter_{steps:07d}"
    assert (path / "metadata.json").is_file(), f"no checkpoint at {path}"
    keys = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    return SimpleNamespace(
        metrics=run / "metrics.jsonl", layers=raw["model"]["num_layers"], checkpoint_keys=keys
    )
