"""TorchTitan probe of the MoBA tests (../test_moba.py): the agent's DeepSeek-V3 model (DeepSeekV3ModelArgs with
moba_block_size / moba_topk) at the tests' tiny shapes, answering in the tests' canonical terms.

    python probe.py pristine <pristine workspace> <out.pt>     (PYTHONPATH = the pristine workspace)

Canonical spec -> DeepSeekV3ModelArgs with all layers dense (MoBA is attention only; the shipped MoE flavor is the
pristine comparison's). The core slot is each layer's `attention.inner_attention` (q, k, v [B, H, S, d], scale=).
"""

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

DEVICE = fp.DEVICE
KEY_PREFIX = ""  # the config errors name the bare key
RUN = {
    "steps": 6,
    "window": 2,
    "drop": 0.05,
}  # the training run: steps, and the drop of the mean loss of its ends
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
fp.torchtitan_cpu_histc()


def model_args(spec: dict, moba):
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    extra = {} if moba is None else {"moba_block_size": moba[0], "moba_topk": moba[1]}
    return DeepSeekV3ModelArgs(
        vocab_size=spec["vocab"], dim=spec["hidden"], inter_dim=48, moe_inter_dim=16, n_layers=spec["layers"],
        n_dense_layers=spec["layers"], n_heads=spec["heads"], norm_eps=1e-6, q_lora_rank=spec["q_lora_rank"],
        kv_lora_rank=spec["kv_lora_rank"], qk_nope_head_dim=spec["qk_nope"], qk_rope_head_dim=spec["qk_rope"],
        v_head_dim=spec["v_head_dim"], max_seq_len=spec["max_seq"], original_seq_len=spec["max_seq"],
        attn_type="sdpa", attn_mask_type="causal", moe_args=MoEArgs(num_experts=4, top_k=2), **extra,
    )  # fmt: skip


def build(args):
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    with torch.device(DEVICE), torch.no_grad():
        model = DeepSeekV3Model(args)
        model.init_weights(buffer_device=torch.device(DEVICE))
    return model.float()


def defaults() -> tuple:
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs

    args = DeepSeekV3ModelArgs()
    return getattr(args, "moba_block_size", None), getattr(args, "moba_topk", None)


def config_error(values: dict) -> str | None:
    """The error of the job config's [model] keys (command-line flags) through the model args of the train spec, as
    the Trainer makes them; None when accepted."""
    from torchtitan.config import ConfigManager
    from torchtitan.protocols import train_spec as ts

    ws = Path(os.environ["ATE_WS"])
    flags = [x for k, v in values.items() for x in (f"--model.{k}", str(v))]
    try:
        import ate_run.deepseek_v2_lite  # noqa: F401  (registers the train spec)

        with contextlib.redirect_stderr(sys.stdout):
            config = ConfigManager().parse_args(
                ["--job.config_file", str(ws / "ate_run" / "tiny.toml"), *flags]
            )
        args = copy.deepcopy(ts.get_train_spec(config.model.name).model_args[config.model.flavor])
        args.update_from_config(config)
        got = tuple(getattr(args, k, None) for k in values)
        if got != tuple(values.values()):
            return f"the model args got {got} for {values}"
    except SystemExit as e:  # the config parser's exit (an unknown flag)
        return f"the config parser exited with status {e.code}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def parameter_shapes(spec: dict, moba) -> dict:
    with torch.device("meta"):
        from torchtitan.models.deepseek_v3 import DeepSeekV3Model

        model = DeepSeekV3Model(model_args(spec, moba))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def forward(spec: dict, moba, ids, init, core=None, grad: bool = False):
    """-> (logits [B, S, vocab] float64 on the CPU, {parameter: gradient of the mean next-token loss} or None) of the
    model with MoBA `moba` = (block, top-k) or None (the default: off); `core(q, k, v, scale)` replaces every
    layer's core attention."""
    model = build(model_args(spec, moba))
    init(model.named_parameters())
    if core is not None:
        for layer in model.layers.values():
            layer.attention.inner_attention.forward = lambda q, k, v, scale=None, **kw: core(q, k, v, scale)
    ids = ids.to(DEVICE)
    with torch.set_grad_enabled(grad):
        logits = model(ids)
    grads = None
    if grad:
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().double().cpu(), grads


# ---- the pristine comparison: the shipped tiny flavor (MoE, YaRN on) with MoBA off ----


def shipped_model(base: Path):
    """The model of the pristine tiny job config (YaRN on), as the Trainer builds it: the train spec's flavor from the
    ate_run on the path (the pristine workspace's or the agent's), updated from the job config."""
    import ate_run.deepseek_v2_lite  # noqa: F401  (registers the train spec)
    from torchtitan.config import ConfigManager
    from torchtitan.protocols import train_spec as ts

    config = ConfigManager().parse_args(["--job.config_file", str(base / "ate_run" / "tiny.toml")])
    args = copy.deepcopy(ts.get_train_spec(config.model.name).model_args[config.model.flavor])
    args.update_from_config(config)
    args.moe_args.use_grouped_mm = False  # torch._grouped_mm (SM90) takes bf16; these checks run in fp32
    return build(args)


def pristine(base: Path, out: Path) -> None:
    import torchtitan

    if not Path(torchtitan.__file__).resolve().is_relative_to(base.resolve()):
        raise ImportError(f"torchtitan was imported from {torchtitan.__file__}, not from {base}")
    torch.manual_seed(1)
    model = shipped_model(base)
    with torch.no_grad():
        for p in model.parameters():  # beyond init: make every weight matter
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids.to(DEVICE)).cpu()
    torch.save(
        {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "ids": ids, "logits": logits}, out
    )


def unchanged(base: Path, saved: Path) -> list:
    """[(what, the agent's output, the pristine's)] with MoBA off."""
    ref = torch.load(saved, weights_only=True)
    model = shipped_model(base)
    model.load_state_dict({k: v.to(DEVICE) for k, v in ref["state"].items()}, strict=True)
    with torch.no_grad():
        logits = model(ref["ids"].to(DEVICE)).cpu()
    return [("tiny flavor logits", logits, ref["logits"])]


# ---- the training run ----


def train(ws: Path, base: Path, run: Path, moba: tuple, steps: int) -> tuple[list, tuple]:
    """The workspace's ate_run/run_train.sh on the tiny job config with MoBA on ($PYTHON: on a machine without a
    GPU, a wrapper that makes TorchTitan train on the CPU). -> (metrics.jsonl rows, the run config's MoBA keys)."""
    cmd = [
        "bash",
        str(ws / "ate_run" / "run_train.sh"),
        "--model.moba_block_size",
        str(moba[0]),
        "--model.moba_topk",
        str(moba[1]),
        "--training.steps",
        str(steps),
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "2",
        "--lr_scheduler.warmup_steps",
        "2",
        "--job.dump_folder",
        str(run),
    ]
    env = {**os.environ, "CONFIG_FILE": str(base / "ate_run" / "tiny.toml"), "NGPU": "1"}
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"the run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    rows = fp.rows(run / "metrics.jsonl")
    model = json.loads((run / "config.json").read_text()).get("model", {})
    return rows, (model.get("moba_block_size"), model.get("moba_topk"))


if __name__ == "__main__":
    pristine(Path(sys.argv[2]), Path(sys.argv[3]))
