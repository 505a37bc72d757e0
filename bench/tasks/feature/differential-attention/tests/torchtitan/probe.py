"""TorchTitan probe of the differential-attention tests: the workspace's DeepSeek-V3 model (torchtitan.models.
deepseek_v3, the model of ate_run's deepseek_v2_lite spec) at the canonical shapes, fp32, in canonical terms.

The feature is turned on as the Trainer does: a job config with --model.diff_attention, given to
DeepSeekV3ModelArgs.update_from_config. Canonical names are TorchTitan's own in layers.{i}.attention (wq, wq_a,
q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo, lambda_*), except head_norm -> head_norm.weight; canonical layer i is
layers["i"] (layer_id i).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # canonical_attention.py; feature_probe.py (verify_lib)
import canonical_attention as ca  # noqa: E402
import feature_probe as fp  # noqa: E402
from canonical_attention import grads, param_shapes, perturb  # noqa: E402, F401  (the probe's)

DEVICE = fp.DEVICE
PACKAGE = "torchtitan"  # must be imported from the workspace (or the pristine copy)
CANONICAL = {k: f"{k}.weight" for k in ("wq", "wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo")}
CANONICAL.update(
    {k: k for k in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}, head_norm="head_norm.weight"
)

fp.torchtitan_cpu_histc()


def model_args(m: dict, diff):
    """DeepSeekV3ModelArgs for canonical shapes m, updated from a job config (with --model.diff_attention when
    diff), as the Trainer does. Plain RoPE unless m["yarn"]; for-loop experts (fp32, any device)."""
    from torchtitan.config import ConfigManager
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    factor, original = m["yarn"] or (1.0, m["seq"])
    args = DeepSeekV3ModelArgs(
        vocab_size=m["vocab"], dim=m["dim"], inter_dim=m["inter"], moe_inter_dim=m["moe_inter"], n_layers=m["layers"],
        n_dense_layers=m["dense_layers"], n_heads=m["heads"], norm_eps=m["eps"], q_lora_rank=m["q_lora_rank"],
        kv_lora_rank=m["kv_lora_rank"], qk_nope_head_dim=m["nope"], qk_rope_head_dim=m["rope"], v_head_dim=m["v"],
        max_seq_len=m["seq"], original_seq_len=original, rope_theta=m["theta"], rope_factor=factor, beta_fast=32,
        beta_slow=1, mscale=0.707, attn_type="sdpa", attn_mask_type="causal",
        moe_args=MoEArgs(num_experts=m["experts"], num_shared_experts=m["shared"], top_k=m["top_k"],
                         score_func="softmax", route_norm=False, route_scale=1.0, score_before_experts=False,
                         use_grouped_mm=False, load_balance_coeff=0.01,
                         num_expert_groups=(m.get("groups") or (None, None))[0],
                         num_limited_groups=(m.get("groups") or (None, None))[1]),
    )  # fmt: skip
    cli = ["--training.seq_len", str(m["seq"]), *(["--model.diff_attention"] if diff else [])]
    args.update_from_config(ConfigManager().parse_args(cli))
    return args


def build(m: dict, diff):
    """The model, initialised by TorchTitan (seed 0); diff None or False: the flag left out."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    args = model_args(m, diff)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = DeepSeekV3Model(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device(DEVICE))
    return model


def rejects(m: dict) -> str | None:
    """The error of the model args' update (or the model's construction) with the feature on; None if accepted."""
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    try:
        args = model_args(m, True)
        with torch.device("meta"):
            DeepSeekV3Model(args)
    except SystemExit as e:  # the job config parser rejected --model.diff_attention
        return f"the job config has no --model.diff_attention ({e})"
    except Exception as e:  # any construction error is the rejection
        return f"{type(e).__name__}: {e}"
    return None


def attn(model, i: int):
    return model.layers[str(i)].attention


new_param_names, lambda_init, attention_params, load_attention, attention_grads = ca.views(
    CANONICAL, attn, "layers.{}.attention")  # the canonical terms, as the other probes give them


def attention(model, i: int, x: torch.Tensor) -> torch.Tensor:
    a = attn(model, i)
    a.zero_grad(set_to_none=True)
    return a(x, model.freqs_cis, None)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(ids)
    return F.cross_entropy(out.flatten(0, 1).float(), labels.flatten())


def state(model) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_state(model, saved: dict) -> None:
    model.load_state_dict(saved, strict=True)


def train(ws: Path, run: Path, steps: int) -> SimpleNamespace:
    """The pristine tiny job config with --model.diff_attention, at the verifier's smaller batch (4 x 64 tokens, as
    PithTrain's verifier runs), through the workspace's ate_run/run_train.sh ($PYTHON: the CPU wrapper in tests),
    saving a model-only checkpoint at the last step. -> metrics path, layers, the checkpoint's keys."""
    from torch.distributed.checkpoint import FileSystemReader

    config = Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml"
    cmd = ["bash", str(ws / "ate_run" / "run_train.sh"), "--model.diff_attention", "--training.steps", str(steps),
           "--training.local_batch_size", "4", "--training.global_batch_size", "4", "--training.seq_len", "64",
           "--job.dump_folder", str(run), "--checkpoint.enable", "--checkpoint.interval", str(steps)]  # fmt: skip
    try:  # TorchTitan's own job-config parse, here: a rejected flag needs no training process
        from torchtitan.config import ConfigManager

        ConfigManager().parse_args(["--job.config_file", str(config), *cmd[2:]])
    except SystemExit as e:
        raise AssertionError(f"the job config rejects --model.diff_attention (exit {e.code})") from None
    env = {**os.environ, "CONFIG_FILE": str(config), "NGPU": "1", "PYTHON": os.environ.get("PYTHON", sys.executable),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the training run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    assert json.loads((run / "config.json").read_text())["model"].get("diff_attention") is True, (
        "the run's config.json lacks model.diff_attention = true"
    )
    path = run / "checkpoint" / f"step-{steps}"
    assert (path / ".metadata").is_file(), f"no checkpoint at {path}"
    keys = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    layers = sum(k.endswith(".attention.wkv_a.weight") for k in keys)  # the flavor's layers, as checkpointed
    return SimpleNamespace(metrics=run / "metrics.jsonl", layers=layers, checkpoint_keys=keys)
