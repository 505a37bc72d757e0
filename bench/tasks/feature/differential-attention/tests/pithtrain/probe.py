"""PithTrain probe of the differential-attention tests: the workspace's DeepSeek-V2 (pithtrain.models.deepseek_v2)
at the canonical shapes, fp32, in canonical terms.

Canonical -> PithTrain, in layers.{i}.self_attn: wq -> q_proj (wq_a, q_norm, wq_b -> q_a_proj, q_a_layernorm,
q_b_proj), wkv_a -> kv_a_proj_with_mqa, kv_norm -> kv_a_layernorm, wkv_b -> kv_b_proj, wo -> o_proj, lambda_* ->
lambda_*, head_norm -> head_norm.weight; canonical layer i is layers["i"]. The config is rejected with PithTrain's
ConfigError only. The run: 20 steps (as before the shared tests), its checkpoint rebuilt from config.json must beat
the initial model's held-out loss.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # canonical_attention.py; feature_probe.py (verify_lib)
import canonical_attention as ca  # noqa: E402
import feature_probe as fp  # noqa: E402
from canonical_attention import grads, param_shapes, perturb  # noqa: E402, F401  (the probe's)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PACKAGE = "pithtrain"  # must be imported from the workspace (or the pristine copy)
STEPS = 20
CANONICAL = {"wq": "q_proj.weight", "wq_a": "q_a_proj.weight", "q_norm": "q_a_layernorm.weight",
             "wq_b": "q_b_proj.weight", "wkv_a": "kv_a_proj_with_mqa.weight", "kv_norm": "kv_a_layernorm.weight",
             "wkv_b": "kv_b_proj.weight", "wo": "o_proj.weight", "lambda_q1": "lambda_q1", "lambda_k1": "lambda_k1",
             "lambda_q2": "lambda_q2", "lambda_k2": "lambda_k2", "head_norm": "head_norm.weight"}  # fmt: skip


def raw_model(m: dict, diff) -> dict:
    raw = {
        "family": "deepseek_v2", "vocab_size": m["vocab"], "hidden_size": m["dim"], "intermediate_size": m["inter"],
        "moe_intermediate_size": m["moe_inter"], "num_hidden_layers": m["layers"], "num_attention_heads": m["heads"],
        "q_lora_rank": m["q_lora_rank"], "kv_lora_rank": m["kv_lora_rank"], "qk_nope_head_dim": m["nope"],
        "qk_rope_head_dim": m["rope"], "v_head_dim": m["v"], "first_k_dense_replace": m["dense_layers"],
        "n_shared_experts": m["shared"], "rms_norm_eps": m["eps"], "rope_theta": m["theta"],
        "rope_scaling_type": "none", "max_position_embeddings": 64,
        "router": {"num_experts": m["experts"], "top_k": m["top_k"]},
    }  # fmt: skip
    if m["yarn"]:
        raw.update(
            rope_scaling_type="yarn", rope_factor=m["yarn"][0], original_max_position_embeddings=m["yarn"][1]
        )
    if m.get("groups"):
        raw["router"].update(n_group=m["groups"][0], topk_group=m["groups"][1])
    if diff is not None:
        raw["diff_attention"] = diff
    return raw


def _config(m: dict, diff):
    from pithtrain.config import build_config

    return build_config({"model": copy.deepcopy(raw_model(m, diff)), "train": {"seq_len": m["seq"]}})


def build(m: dict, diff):
    from pithtrain.config import model_classes

    cfg = _config(m, diff)
    model = model_classes(cfg.family)[1](cfg.model)
    torch.manual_seed(0)
    model.init_weights()
    return model.to(DEVICE)


def rejects(m: dict) -> str | None:
    from pithtrain.config import ConfigError

    try:
        _config(m, True)
    except ConfigError as e:
        return str(e)
    return None


def attn(model, i: int):
    return model.layers[str(i)].self_attn


new_param_names, lambda_init, attention_params, load_attention, attention_grads = ca.views(
    CANONICAL, attn, "layers.{}.self_attn")  # the canonical terms, as the other probes give them


def attention(model, i: int, x: torch.Tensor) -> torch.Tensor:
    a = attn(model, i)
    a.zero_grad(set_to_none=True)
    cos, sin = model.rope(x.shape[1], x.device, x.dtype)
    return a(x, cos, sin)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return model(ids, labels=labels).loss


def state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_state(model, saved: dict) -> None:
    model.load_state_dict(saved, strict=True)


def train(ws: Path, run: Path, steps: int) -> SimpleNamespace:
    """The pristine tiny config with --set model.diff_attention=true through the workspace's `pithtrain.train`, at
    4 x 64 tokens per step; its final checkpoint, rebuilt from the run's config.json, must beat the initial model's
    held-out loss by 0.3. -> metrics path, layers, the parameter names the checkpoint loaded into."""
    config = Path(os.environ["ATE_BASE"]) / "configs" / "tiny-deepseek-v2-lite.toml"
    sets = {"model.diff_attention": "true", "train.steps": steps, "train.seq_len": 64, "train.micro_batch_size": 4,
            "train.log_every": 5, "train.eval_batches": 1, "train.device": DEVICE, "checkpoint.every": 0,
            "train.run_dir": run}  # fmt: skip
    cmd = [sys.executable, "-m", "pithtrain.train", "--config", str(config)]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run(cmd, cwd=ws, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=400)  # fmt: skip
    assert r.returncode == 0, f"the training run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    raw = json.loads((run / "config.json").read_text())
    raw.pop("source", None)
    assert raw["model"].get("diff_attention") is True, (
        "the run's config.json lacks model.diff_attention = true"
    )
    cfg, before, after, keys = fp.pithtrain_heldout(raw, run)  # its loading fails on a name the checkpoint lacks
    assert math.isfinite(after) and after < before - 0.3, f"held-out loss {before:.3f} -> {after:.3f}"
    return SimpleNamespace(
        metrics=run / "metrics.jsonl", layers=cfg.model.num_hidden_layers, checkpoint_keys=keys
    )
