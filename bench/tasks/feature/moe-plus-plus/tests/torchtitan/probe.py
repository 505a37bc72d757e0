"""TorchTitan probe of feature/moe-plus-plus: builds the agent's MoE++ layer and models (torchtitan/models/moe/moe.py,
the DeepSeek-V3 model of ate_run's deepseek_v2_lite spec) and answers test_moe_plus_plus.py in canonical terms.

Canonical parameters <-> TorchTitan's MoE: gate [N, H] = router.gate.weight, residual [N, N] = router.residual_weight,
w_gate/w_up [E, I, H] = experts.w1/w3, w_down [E, H, I] = experts.w2, mix [K, 2, H] = constant_experts.w_mix,
value [K, H] = constant_experts.value, shared_gate/up/down = shared_experts.w1/w3/w2.weight.

    python probe.py dump OUT   (PYTHONPATH = a workspace): the tiny model with MoE++ off, as feature_off compares it
"""

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

DEVICE = fp.DEVICE
NAMES = {
    "gate": "router.gate.weight",
    "residual": "router.residual_weight",
    "w_gate": "experts.w1",
    "w_up": "experts.w3",
    "w_down": "experts.w2",
    "mix": "constant_experts.w_mix",
    "value": "constant_experts.value",
    "shared_gate": "shared_experts.w1.weight",
    "shared_up": "shared_experts.w3.weight",
    "shared_down": "shared_experts.w2.weight",
}
KEYS = {"zero": "num_zero_experts", "copy": "num_copy_experts", "constant": "num_constant_experts"}
FAMILIES = ("tiny",)  # ate_run's deepseek_v2_lite flavor
TINY_MOEPP = {
    "num_zero_experts": 1,
    "num_copy_experts": 1,
    "num_constant_experts": 2,
    "gating_residual": True,
}

fp.torchtitan_cpu_histc()


def defaults() -> dict:
    """The MoE++ settings of MoEArgs left at its defaults."""
    from torchtitan.models.moe import MoEArgs

    a = MoEArgs()
    return {kind: getattr(a, key, None) for kind, key in KEYS.items()} | {"residual": getattr(a, "gating_residual", None)}


def config_error(kind: str, value: int) -> str | None:
    """The ValueError message of a MoE++ count set to `value`, or None when accepted."""
    from torchtitan.models.moe import MoEArgs

    try:
        MoEArgs(**{KEYS[kind]: value})
    except ValueError as e:
        return str(e)
    return None


def moe_args(spec: dict, **extra):
    from torchtitan.models.moe import MoEArgs

    return MoEArgs(
        num_experts=spec["E"],
        num_shared_experts=spec["shared"],
        top_k=spec["top_k"],
        score_func=spec["score_func"],
        route_norm=spec["norm_topk"],
        route_scale=spec["scale"],
        score_before_experts=False,
        use_grouped_mm=False,
        load_balance_coeff=1e-3,
        **{KEYS[k]: spec[k] for k in KEYS},
        gating_residual=spec["residual"],
        **extra,
    )


def build(spec: dict, params: dict | None):
    """The agent's MoE layer at the spec's shapes (fp32, for-loop experts), with the canonical `params` loaded."""
    from torchtitan.models.moe.moe import MoE

    with torch.device(DEVICE):
        layer = MoE(moe_args(spec), dim=spec["H"], hidden_dim=spec["I"])
    own = dict(layer.named_parameters())
    with torch.no_grad():
        for name, value in (params or {}).items():
            own[NAMES[name]].copy_(value)
    return layer


def shapes(layer) -> dict:
    """{canonical or TorchTitan name: shape} of the layer's parameters."""
    back = {v: k for k, v in NAMES.items()}
    return {back.get(k, k): tuple(p.shape) for k, p in layer.named_parameters()}


def forward(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict:
    """x [T, H] -> {y [T, H], logits [T, N], weights [T, N] (dense combine weights), load [N]}."""
    seen = []
    hook = layer.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    layer.tokens_per_expert.zero_()
    try:
        y, logits = layer(x.to(DEVICE)[None], None if residual is None else residual.to(DEVICE))
    finally:
        hook.remove()
    top_scores, selected = seen[0][0], seen[0][1]
    weights = torch.zeros(logits.shape, device=logits.device).scatter_add(1, selected, top_scores.float())
    return {"y": y[0], "logits": logits, "weights": weights, "load": layer.tokens_per_expert.detach().clone()}


def grads(layer) -> dict:
    """{canonical name: gradient} of the layer's parameters."""
    own = dict(layer.named_parameters())
    return {name: own[v].grad for name, v in NAMES.items() if v in own}


# ---- the tiny DeepSeek-V2-Lite model of ate_run ----


def tiny_model(moepp: bool, residual: bool = True, layers: int = 3, family: str = "tiny"):
    """ate_run's tiny flavor (fp32, for-loop experts) with MoE++ on (one zero, one copy, two constant experts) or
    off, initialised by TorchTitan (seed 0)."""
    import ate_run.deepseek_v2_lite as spec
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model

    args = copy.deepcopy(spec.FLAVORS[family])
    extra = {**TINY_MOEPP, "gating_residual": residual} if moepp else {}
    args = dataclasses.replace(
        args, n_layers=layers, moe_args=dataclasses.replace(args.moe_args, use_grouped_mm=False, **extra)
    )
    args.moe_impl = "standard"  # what update_from_config sets from the job config
    torch.manual_seed(0)
    with torch.device(DEVICE), torch.no_grad():
        model = DeepSeekV3Model(args)
        model.init_weights(buffer_device=torch.device(DEVICE))
    return model


def moe_layers(model) -> list:
    return [b.moe for b in model.layers.values() if getattr(b, "moe_enabled", False)]


def residual_params(model) -> list:
    return [m.router.residual_weight for m in moe_layers(model)]


def load_state(dst, src) -> tuple[list, list]:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    return list(missing), list(unexpected)


def logits_and_loss(model, tokens: torch.Tensor, labels: torch.Tensor):
    out = model(tokens.to(DEVICE))
    return out, F.cross_entropy(out.flatten(0, 1).float(), labels.to(DEVICE).flatten())


def router_trace(model, tokens: torch.Tensor) -> list:
    """Per MoE layer in order: (router input [T, H], logits [T, N], W [N, H], R [N, N] or None)."""
    seen = []
    hooks = [
        m.router.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append(
                (
                    (args[0] if args else kwargs["x"]).detach(),
                    out[3].detach(),
                    mod.gate.weight.detach(),
                    None if mod.residual_weight is None else mod.residual_weight.detach(),
                )
            ),
            with_kwargs=True,
        )
        for m in moe_layers(model)
    ]
    try:
        model(tokens.to(DEVICE))
    finally:
        for h in hooks:
            h.remove()
    return seen


def model_grads(model, kind: str) -> list:
    name = NAMES[kind]
    return [dict(m.named_parameters())[name].grad for m in moe_layers(model)]


def model_load(model) -> torch.Tensor:
    """[MoE layers, N] tokens per choice counted since the last reset_load."""
    return torch.stack([m.tokens_per_expert.detach().clone() for m in moe_layers(model)])


def reset_load(model) -> None:
    for m in moe_layers(model):
        m.tokens_per_expert.zero_()


# ---- end to end ----


def train(ws: Path, out: Path, steps: int) -> tuple[list, str]:
    """A short run of the workspace's launch entry with MoE++ on (flavor tiny_moepp); -> (metrics rows, log tail)."""
    env = {**os.environ, "PYTHONPATH": str(ws), "CONFIG_FILE": "ate_run/tiny.toml"}
    cmd = [
        "bash",
        str(ws / "ate_run" / "run_train.sh"),
        "--model.flavor",
        "tiny_moepp",
        "--training.steps",
        str(steps),
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "4",
        "--training.global_batch_size",
        "4",
        "--job.dump_folder",
        str(out),
        "--metrics.log_freq",
        "1",
    ]
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    rows = fp.rows(out / "metrics.jsonl", missing_ok=True)
    return rows, (r.stdout + r.stderr)[-1500:] if r.returncode else ""


def _dump() -> dict:
    """The tiny model with MoE++ off: parameter shapes, logits, loss, load and gradients of one batch."""
    torch.backends.cuda.matmul.allow_tf32 = False  # both sides in plain fp32
    model = tiny_model(moepp=False)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 4096, (2, 32), generator=g)
    logits, loss = logits_and_loss(model, tokens, tokens.roll(-1, 1))
    loss.backward()
    return {"tiny": {"shapes": {k: tuple(p.shape) for k, p in model.named_parameters()},
            "logits": logits.detach().cpu(), "loss": loss.detach().cpu(), "load": model_load(model).cpu(),
            "grads": {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}}}  # fmt: skip


def dump(out: Path) -> dict:
    """_dump() of the workspace, in this process."""
    return _dump()


def dump_pristine(base: Path, out: Path) -> dict:
    """_dump() of the pristine framework, in a process of its own with it on PYTHONPATH."""
    return fp.dump_pristine(__file__, [out], base, out, cwd=out.parent)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "dump":
        torch.save(_dump(), sys.argv[2])
