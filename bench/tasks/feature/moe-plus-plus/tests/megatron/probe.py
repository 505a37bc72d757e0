"""Megatron-Core probe of feature/moe-plus-plus: the workspace's MoELayer (megatron/core/transformer/moe/) and GPT
models built through its launch entry ate_run/pretrain_gpt.py, answering test_moe_plus_plus.py in canonical terms.
The interface it relies on is the instruction's: TransformerConfig.moe_zero_experts / moe_copy_experts /
moe_constant_experts / moe_router_gating_residual, the router's `residual_weight`, MoELayer.constant_experts, and
MoEGatingResidual (megatron/core/transformer/moe/router.py), passed as `gating_residual` to MoELayer.forward and
TopKRouter.forward, which leave the router's logits in it.

Canonical parameters <-> Megatron's MoELayer: gate [N, H] = router.weight, residual [N, N] = router.residual_weight,
w_gate/w_up [E, I, H] = the two halves of experts.local_experts.<e>.linear_fc1.weight [2I, H], w_down [E, H, I] =
experts.local_experts.<e>.linear_fc2.weight, mix [K, 2, H] = constant_experts.w_mix, value [K, H] =
constant_experts.value, shared_gate/up/down = shared_experts.linear_fc1 (halves) / linear_fc2.

    python probe.py dump OUT   (PYTHONPATH = a workspace): the feature-off tiny model, as feature_off compares it
"""

import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

DEVICE = fp.DEVICE
KEYS = {"zero": "moe_zero_experts", "copy": "moe_copy_experts", "constant": "moe_constant_experts"}
RESIDUAL_KEY = "moe_router_gating_residual"
FAMILIES = ("tiny",)  # ate_run/tiny.toml
TINY_MOEPP = {KEYS["zero"]: 1, KEYS["copy"]: 1, KEYS["constant"]: 2, RESIDUAL_KEY: True}
# Megatron's torch.compile'd fusions (SwiGLU, bias-dropout-add) stay off: compiling costs more than the tiny runs.
NO_FUSION = {"bias_activation_fusion": False, "bias_dropout_fusion": False}
FP32 = {"bf16": False, "params_dtype": torch.float32, "pipeline_dtype": torch.float32}
NAMES = {"gate": "router.weight", "residual": "router.residual_weight", "mix": "constant_experts.w_mix",
         "value": "constant_experts.value"}  # fmt: skip
FC1, FC2 = "experts.local_experts.{}.linear_fc1.weight", "experts.local_experts.{}.linear_fc2.weight"
SHARED1, SHARED2 = "shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"


def _tiny(model: dict | None = None) -> dict:
    return fp.megatron_tiny({"model": model or {}})


def defaults() -> dict:
    """The MoE++ settings of a TransformerConfig left at its defaults."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4)
    return {kind: getattr(c, key, None) for kind, key in KEYS.items()} | {"residual": getattr(c, RESIDUAL_KEY, None)}


def config_error(kind: str, value: int) -> str | None:
    """The one-line error of the launch entry's config check (TransformerConfig.__post_init__) for a MoE++ count set
    to `value` in [model], or None when accepted."""
    pg = fp.megatron_entry()
    try:
        config = pg.model_config(_tiny({KEYS[kind]: value}), "meta")
    except ValueError as e:  # ate_run's ConfigError is one
        return f"{type(e).__name__}: {e}"
    assert getattr(config, KEYS[kind]) == value, (KEYS[kind], getattr(config, KEYS[kind], None))
    return None


def routable(spec: dict) -> bool:
    """Megatron's sigmoid top-k always renormalises the k weights, its softmax top-1 never does."""
    if spec["score_func"] == "sigmoid":
        return spec["top_k"] == 1 or spec["norm_topk"]
    return spec["top_k"] > 1 or not spec["norm_topk"]


def build(spec: dict, params: dict | None):
    """The MoELayer of the tiny config's layer spec at the spec's shapes (fp32, SequentialMLP experts, no aux loss,
    eval mode), with the canonical `params` loaded."""
    from megatron.core.transformer.spec_utils import build_module

    pg = fp.megatron_entry()
    cfg = _tiny()
    softmax = spec["score_func"] == "softmax"
    cfg["model"].update(
        hidden_size=spec["H"], moe_ffn_hidden_size=spec["I"], num_moe_experts=spec["E"],
        moe_router_topk=spec["top_k"], moe_router_score_function=spec["score_func"],
        moe_router_pre_softmax=softmax and not spec["norm_topk"],  # softmax over all N, or over the top k
        moe_router_topk_scaling_factor=None if spec["scale"] == 1.0 else spec["scale"],
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_shared_expert_intermediate_size=spec["shared"] * spec["I"] or None,
        **{KEYS[k]: spec[k] for k in KEYS}, **{RESIDUAL_KEY: spec["residual"]}, **NO_FUSION, **FP32,
    )  # fmt: skip
    config = pg.model_config(cfg, DEVICE)
    layer_spec = pg.layer_specs(config, "local").layer_specs[1].submodules.mlp
    layer = build_module(layer_spec, config=config).to(DEVICE).float().eval()
    if params:
        load(layer, params)
    return layer


def _canonical(named: dict, experts: int) -> dict:
    """{canonical name: tensor} from Megatron's parameters (or their gradients); None where one is missing."""
    out = {k: named.get(v) for k, v in NAMES.items() if v in named}
    fc1 = [named.get(FC1.format(e)) for e in range(experts)]
    fc2 = [named.get(FC2.format(e)) for e in range(experts)]
    if fc1 and all(t is not None for t in fc1 + fc2):
        i = fc1[0].shape[0] // 2
        out |= {"w_gate": torch.stack([t[:i] for t in fc1]), "w_up": torch.stack([t[i:] for t in fc1]),
                "w_down": torch.stack(fc2)}  # fmt: skip
    if named.get(SHARED1) is not None and named.get(SHARED2) is not None:
        s = named[SHARED1].shape[0] // 2
        out |= {"shared_gate": named[SHARED1][:s], "shared_up": named[SHARED1][s:], "shared_down": named[SHARED2]}
    return out


def _num_experts(layer) -> int:
    return len(layer.experts.local_experts)


def load(layer, params: dict) -> None:
    p = dict(layer.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            if name in NAMES:
                p[NAMES[name]].copy_(value)
        for e in range(_num_experts(layer)):
            i = params["w_gate"].shape[1]
            p[FC1.format(e)][:i].copy_(params["w_gate"][e])
            p[FC1.format(e)][i:].copy_(params["w_up"][e])
            p[FC2.format(e)].copy_(params["w_down"][e])
        if "shared_gate" in params:
            s = params["shared_gate"].shape[0]
            p[SHARED1][:s].copy_(params["shared_gate"])
            p[SHARED1][s:].copy_(params["shared_up"])
            p[SHARED2].copy_(params["shared_down"])


def shapes(layer) -> dict:
    """{canonical or Megatron name: shape} of the layer's parameters."""
    named = dict(layer.named_parameters())
    known = re.compile(r"router\.(weight|residual_weight)|constant_experts\.(w_mix|value)|"
                       r"(experts\.local_experts\.\d+|shared_experts)\.linear_fc[12]\.weight")  # fmt: skip
    out = {k: tuple(v.shape) for k, v in _canonical(named, _num_experts(layer)).items()}
    return out | {k: tuple(v.shape) for k, v in named.items() if not known.fullmatch(k)}


def forward(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict:
    """x [T, H] -> {y [T, H], logits [T, N], weights [T, N] (the router's probs), load [N]}."""
    from megatron.core.transformer.moe.router import MoEGatingResidual

    seen = []
    hook = layer.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    carry = MoEGatingResidual(None if residual is None else residual.to(DEVICE))
    try:
        y, _ = layer(x.to(DEVICE).view(x.shape[0], 1, -1), gating_residual=carry)
    finally:
        hook.remove()
    probs, routing_map = seen[0]
    return {"y": y.view(x.shape), "logits": carry.logits, "weights": probs.float(), "load": routing_map.long().sum(0)}


def grads(layer) -> dict:
    """{canonical name: gradient} of the layer's parameters."""
    named = {k: p.grad for k, p in layer.named_parameters()}
    return _canonical(named, _num_experts(layer))


# ---- the tiny GPT model of ate_run ----


def _count_load(module, args, out) -> None:
    module.ate_load = module.ate_load + out[1].detach().long().sum(0)


def tiny_model(moepp: bool, residual: bool = True, layers: int = 3, family: str = "tiny"):
    """ate_run's tiny config (fp32, fusions off, first layer dense) with MoE++ on (one zero, one copy, two constant
    experts) or off, initialised by the launch entry (train.seed); its routers count their load."""
    from megatron.core.transformer.moe.router import TopKRouter

    pg = fp.megatron_entry()
    extra = {**TINY_MOEPP, RESIDUAL_KEY: residual} if moepp else {}
    model = {"num_layers": layers, "moe_layer_freq": [0] + [1] * (layers - 1), **extra, **NO_FUSION}
    cfg = _tiny(model)
    cfg["model"].update(FP32)
    gpt = pg.build_model(cfg, DEVICE).to(DEVICE)
    for m in gpt.modules():
        if isinstance(m, TopKRouter):
            m.ate_load = 0
            m.register_forward_hook(_count_load)
    return gpt


def moe_layers(model) -> list:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def residual_params(model) -> list:
    return [m.router.residual_weight for m in moe_layers(model)]


def load_state(dst, src) -> tuple[list, list]:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    return [k for k in missing if not k.endswith("_extra_state")], [k for k in unexpected if not k.endswith("_extra_state")]


def logits_and_loss(model, tokens: torch.Tensor, labels: torch.Tensor):
    """(logits [B, S, V], mean next-token cross entropy) of a training forward."""
    tokens = tokens.to(DEVICE)
    pos = torch.arange(tokens.shape[1], device=DEVICE).unsqueeze(0).expand_as(tokens)
    out = model(tokens, pos, None)
    return out, F.cross_entropy(out.flatten(0, 1).float(), labels.to(DEVICE).flatten())


def router_trace(model, tokens: torch.Tensor) -> list:
    """Per MoE layer in order: (router input [T, H], logits [T, N], W [N, H], R [N, N] or None)."""
    seen = []

    def record(mod, args, kwargs, out):
        x, r = args[0] if args else kwargs["input"], mod.residual_weight
        carry = kwargs.get("gating_residual", args[2] if len(args) > 2 else None)
        assert carry is not None, "the MoE layer's router got no gating_residual"
        seen.append((x.detach().reshape(-1, x.shape[-1]), carry.logits.detach(), mod.weight.detach(),
                     None if r is None else r.detach()))  # fmt: skip

    hooks = [m.router.register_forward_hook(record, with_kwargs=True) for m in moe_layers(model)]
    try:
        logits_and_loss(model, tokens, tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


def model_grads(model, kind: str) -> list:
    return [_canonical({k: p.grad for k, p in m.named_parameters()}, _num_experts(m)).get(kind) for m in moe_layers(model)]


def model_load(model) -> torch.Tensor:
    """[MoE layers, N] tokens per choice the routers returned since the last reset_load."""
    return torch.stack([torch.as_tensor(m.router.ate_load).detach().cpu() for m in moe_layers(model)])


def reset_load(model) -> None:
    for m in moe_layers(model):
        m.router.ate_load = 0


# ---- end to end ----


def train(ws: Path, out: Path, steps: int) -> tuple[list, str]:
    """A short run of the workspace's launch entry on a copy of the tiny config with every MoE++ option on (batch
    4 x 64 tokens, fusions off); -> (metrics rows, log tail on failure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = (Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml").read_text()
    extra = "".join(f"{k} = {str(v).lower()}\n" for k, v in {**TINY_MOEPP, **NO_FUSION}.items())
    config = out.parent / "tiny-moepp.toml"
    config.write_text(fp.small_batch(text, extra))
    r = fp.megatron_train(ws, config, out, steps, timeout=400)
    return fp.rows(out / "metrics.jsonl", missing_ok=True), (r.stdout + r.stderr)[-1500:] if r.returncode else ""


def _dump() -> dict:
    """The tiny model with MoE++ off: state shapes, logits, loss, load and gradients of one batch."""
    model = tiny_model(moepp=False)
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    logits, loss = logits_and_loss(model, x, x.roll(-1, 1))
    loss.backward()
    return {"tiny": {"shapes": {k: tuple(v.shape) for k, v in model.state_dict().items() if hasattr(v, "shape")},
            "logits": logits.detach().float().cpu(), "loss": loss.detach().cpu(), "load": model_load(model),
            "grads": {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.grad is not None}}}  # fmt: skip


def dump(out: Path) -> dict:
    """_dump() of the workspace, in this process."""
    return _dump()


def dump_pristine(base: Path, out: Path) -> dict:
    """_dump() of the pristine framework, in a process with it first on PYTHONPATH."""
    return fp.dump_pristine(__file__, [out], base, out, cwd=base)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "dump":
        torch.save(_dump(), sys.argv[2])
