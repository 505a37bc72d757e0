"""Megatron-Core probe of the MoBA tests (../test_moba.py): the agent's GPTModel (TransformerConfig.moba_block_size /
moba_topk) built by the workspace's launch entry ate_run/pretrain_gpt.py at the tests' tiny shapes, answering in the
tests' canonical terms.

    python probe.py pristine <pristine workspace> <out.pt>     (PYTHONPATH = the pristine workspace)

Canonical spec -> the [model] table of an MLA config with dense layers in fp32 (MoBA is attention only; the shipped MoE
config is the pristine comparison's). The core slot is each layer's `self_attention.core_attention` (query, key, value
[S, B, H, d] -> [S, B, H * d_v], its softmax_scale).
"""

import json
import os
import sys
import tomllib
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
FP32 = {"bf16": False, "params_dtype": torch.float32, "pipeline_dtype": torch.float32}


def pg():
    import ate_run.pretrain_gpt

    return ate_run.pretrain_gpt


def config(spec: dict, moba) -> dict:
    model = dict(
        multi_latent_attention=True, num_layers=spec["layers"], hidden_size=spec["hidden"],
        num_attention_heads=spec["heads"], ffn_hidden_size=48, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        qk_layernorm=True, q_lora_rank=spec["q_lora_rank"], kv_lora_rank=spec["kv_lora_rank"],
        qk_head_dim=spec["qk_nope"], qk_pos_emb_head_dim=spec["qk_rope"], v_head_dim=spec["v_head_dim"],
        kv_channels=spec["v_head_dim"], rope_type="rope", rotary_base=10000.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, **FP32,
    )  # fmt: skip
    if moba is not None:
        model.update(moba_block_size=moba[0], moba_topk=moba[1])
    gpt = {"vocab_size": spec["vocab"], "position_embedding_type": "rope", "max_sequence_length": spec["max_seq"],
           "share_embeddings_and_output_weights": False}  # fmt: skip
    return {"model": model, "gpt": gpt, "train": {"seed": 0, "seq_length": spec["max_seq"]}}


def defaults() -> tuple:
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    return fields.get("moba_block_size"), fields.get("moba_topk")


def config_error(values: dict) -> str | None:
    """The launch entry's error for the [model] keys on the tiny config (its CLI prints it and exits 2); None when
    accepted."""
    try:
        cfg = pg().load_config(Path(os.environ["ATE_WS"]) / "ate_run" / "tiny.toml", {"model": values})
    except Exception as e:
        return str(e)
    got = {k: cfg["model"].get(k) for k in values}
    return None if got == values else f"the resolved config has {got} for {values}"


def parameter_shapes(spec: dict, moba) -> dict:
    """Built on DEVICE, not "meta": the launch entry's meta build turns on its CPU emulation for the whole process."""
    with pg().device_mode(DEVICE):
        model = pg().build_model(config(spec, moba), DEVICE)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def logits_of(model, ids):
    ids = ids.to(DEVICE)
    positions = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
    return model(ids, positions, None)


def forward(spec: dict, moba, ids, init, core=None, grad: bool = False):
    """-> (logits [B, S, vocab] float64 on the CPU, {parameter: gradient of the mean next-token loss} or None) of the
    model with MoBA `moba` = (block, top-k) or None (the default: off); `core(q, k, v, scale)` replaces every
    layer's core attention."""
    with pg().device_mode(DEVICE):
        model = pg().build_model(config(spec, moba), DEVICE).to(DEVICE)
        init(model.named_parameters())
        if core is not None:
            for layer in model.decoder.layers:
                ca = layer.self_attention.core_attention

                def run(query, key, value, *args, ca=ca, **kwargs):
                    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [B, H, S, d]
                    return core(q, k, v, ca.softmax_scale).permute(2, 0, 1, 3).flatten(2)

                ca.forward = run
        with torch.set_grad_enabled(grad):
            logits = logits_of(model, ids)
        grads = None
        if grad:
            ids = ids.to(DEVICE)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads = {
                n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None
            }
    return logits.detach().double().cpu(), grads


# ---- the pristine comparison: the shipped tiny config (MoE, YaRN) in fp32 with MoBA off ----


def shipped_model(base: Path):
    cfg = pg().load_config(base / "ate_run" / "tiny.toml")
    cfg["model"].update(FP32)
    cfg["train"]["seed"] = 1
    return pg().build_model(cfg, DEVICE).to(DEVICE)


def pristine(base: Path, out: Path) -> None:
    import megatron.core

    if not Path(megatron.core.__file__).resolve().is_relative_to(base.resolve()):
        raise ImportError(f"megatron.core was imported from {megatron.core.__file__}, not from {base}")
    with pg().device_mode(DEVICE):
        model = shipped_model(base)
        with torch.no_grad():
            for p in model.parameters():  # beyond init: make every weight matter
                p.add_(0.05 * torch.randn_like(p))
            ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(2))
            logits = logits_of(model, ids).cpu()
        state = {k: v.cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"state": state, "ids": ids, "logits": logits}, out)


def unchanged(base: Path, saved: Path) -> list:
    """[(what, the agent's output, the pristine's)] with MoBA off."""
    ref = torch.load(saved, weights_only=True)
    with pg().device_mode(DEVICE):
        model = shipped_model(base)
        mine = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert mine == set(ref["state"]), f"state-dict keys differ: {sorted(mine ^ set(ref['state']))[:6]}"
        model.load_state_dict({k: v.to(DEVICE) for k, v in ref["state"].items()}, strict=False)
        with torch.no_grad():
            logits = logits_of(model, ref["ids"]).cpu()
    return [("tiny config logits", logits, ref["logits"])]


# ---- the training run ----


def train(ws: Path, base: Path, run: Path, moba: tuple, steps: int) -> tuple[list, tuple]:
    """The workspace's launch entry on the pristine tiny config with [model] moba_block_size / moba_topk added (and
    2 sequences a step). On the CPU (tests only) the launch entry's emulation, with the torch.compile'd fusions off:
    they cost more to compile than the run. -> (metrics.jsonl rows, the run config's MoBA keys)."""
    raw = tomllib.loads((base / "ate_run" / "tiny.toml").read_text())
    raw["model"].update(moba_block_size=moba[0], moba_topk=moba[1])
    raw["train"].update(micro_batch_size=2, global_batch_size=2, lr_warmup_iters=2)
    if DEVICE == "cpu":
        raw["model"].update(bias_activation_fusion=False, bias_dropout_fusion=False)
    run.mkdir(parents=True)
    r = fp.megatron_train(ws, fp.write_toml(raw, run.parent / "moba.toml"), run, steps, timeout=400)
    assert r.returncode == 0, f"the run exited {r.returncode}: {(r.stdout + r.stderr)[-800:]}"
    rows = fp.rows(run / "metrics.jsonl")
    model = json.loads((run / "config.json").read_text()).get("model", {})
    return rows, (model.get("moba_block_size"), model.get("moba_topk"))


if __name__ == "__main__":
    pristine(Path(sys.argv[2]), Path(sys.argv[3]))
