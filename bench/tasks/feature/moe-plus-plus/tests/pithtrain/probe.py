"""PithTrain probe of feature/moe-plus-plus: the workspace's MoE (pithtrain/models/blocks.py), both model families'
tiny configs and its trainer, answering test_moe_plus_plus.py in canonical terms. The interface it relies on is the
instruction's: the model.router keys, MoE.gate (`weight`, `residual_weight`, a RouterOutput with `logits`),
MoE.constant_experts, MoE.forward(x, residual) and the models' expert_load.

Canonical parameters <-> PithTrain's MoE: gate [N, H] = gate.weight, residual [N, N] = gate.residual_weight,
w_gate/w_up [E, I, H] = the halves of experts.w_gate_up [E, H, 2I] (transposed), w_down [E, H, I] = experts.w_down
[E, I, H] (transposed), mix / value = constant_experts.w_mix / value, shared_gate/up/down = shared_experts.*_proj.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

DEVICE = "cpu"
PREFIX = "model.router."
FIELDS = {"zero": "num_zero_experts", "copy": "num_copy_experts", "constant": "num_constant_experts"}
KEYS = {kind: PREFIX + field for kind, field in FIELDS.items()}  # the config keys errors must name
FAMILIES = ("tiny-deepseek-v2-lite", "tiny-qwen3-moe")  # both model families' tiny configs
TINY_MOEPP = {"num_zero_experts": 1, "num_copy_experts": 1, "num_constant_experts": 2}


def _config(name: str, sets=()):
    from pithtrain.config import load_config

    return load_config(Path(os.environ["ATE_BASE"]) / "configs" / f"{name}.toml", list(sets))


def defaults() -> dict:
    from pithtrain.models.blocks import RouterConfig

    r = RouterConfig()
    return {kind: getattr(r, f, None) for kind, f in FIELDS.items()} | {"residual": getattr(r, "gating_residual", None)}


def config_error(kind: str, value: int) -> str | None:
    """Both one-line errors, of RouterConfig.validate and of load_config (both tiny configs), for a MoE++ count set to
    `value`: None unless both reject it; the first that does not name the key where one does not."""
    from pithtrain.config import ConfigError
    from pithtrain.models.blocks import RouterConfig

    field = FIELDS[kind]
    msgs = []
    try:
        RouterConfig(**{field: value}).validate()
        msgs.append(None)
    except ValueError as e:
        msgs.append(str(e))
    try:
        got = {getattr(_config(name, [f"{KEYS[kind]}={value}"]).model.router, field) for name in FAMILIES}
        assert got == {value}, (field, got)
        msgs.append(None)
    except ConfigError as e:
        msgs.append(str(e))
    if None in msgs:
        return None
    return next((m for m in msgs if KEYS[kind] not in m), "; ".join(msgs))


def build(spec: dict, params: dict | None):
    """pithtrain.models.blocks.MoE at the spec's shapes, with the canonical `params` loaded."""
    from pithtrain.models.blocks import MoE, RouterConfig

    cfg = RouterConfig(num_experts=spec["E"], top_k=spec["top_k"], score_func=spec["score_func"],
                       norm_topk_prob=spec["norm_topk"], routed_scaling_factor=spec["scale"],
                       gating_residual=spec["residual"], **{FIELDS[k]: spec[k] for k in FIELDS})  # fmt: skip
    cfg.validate()
    layer = MoE(spec["H"], spec["I"], cfg, num_shared_experts=spec["shared"])
    if params:
        with torch.no_grad():
            for name, (p, view) in _params(layer).items():
                if name in params:
                    view(p).copy_(params[name])
    return layer


def _params(layer) -> dict:
    """canonical name -> (PithTrain parameter, its canonical view)."""
    named, i = dict(layer.named_parameters()), layer.experts.w_down.shape[1]
    t = lambda p: p.transpose(-2, -1)  # noqa: E731
    table = {
        "gate": ("gate.weight", lambda p: p),
        "residual": ("gate.residual_weight", lambda p: p),
        "w_gate": ("experts.w_gate_up", lambda p: t(p[..., :i])),
        "w_up": ("experts.w_gate_up", lambda p: t(p[..., i:])),
        "w_down": ("experts.w_down", t),
        "mix": ("constant_experts.w_mix", lambda p: p),
        "value": ("constant_experts.value", lambda p: p),
        "shared_gate": ("shared_experts.gate_proj.weight", lambda p: p),
        "shared_up": ("shared_experts.up_proj.weight", lambda p: p),
        "shared_down": ("shared_experts.down_proj.weight", lambda p: p),
    }
    return {k: (named[name], view) for k, (name, view) in table.items() if name in named}


def shapes(layer) -> dict:
    """{canonical or PithTrain name: shape} of the layer's parameters."""
    own = _params(layer)
    known = {id(p) for p, _ in own.values()}
    out = {k: tuple(view(p).shape) for k, (p, view) in own.items()}
    return out | {k: tuple(p.shape) for k, p in layer.named_parameters() if id(p) not in known}


def dense(route, n: int) -> torch.Tensor:
    """The route's combine weights as [T, N] (sum over slots naming the same choice)."""
    assert route.expert_ids.min() >= 0 and route.expert_ids.max() < n, route.expert_ids
    out = torch.zeros(route.expert_ids.shape[0], n)
    return out.scatter_add(1, route.expert_ids, route.gate_weights.float())


def forward(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict:
    """x [T, H] -> {y [T, H], logits [T, N], weights [T, N], load [N]}, through MoE.forward(x, residual)."""
    y, route = layer(x[None], residual=residual) if residual is not None else layer(x[None])
    n = layer.gate.weight.shape[0]
    return {"y": y[0], "logits": route.logits, "weights": dense(route, n).detach(), "load": route.load}


def grads(layer) -> dict:
    return {k: None if p.grad is None else view(p.grad) for k, (p, view) in _params(layer).items()}


# ---- the tiny models ----


def tiny_model(moepp: bool, residual: bool = True, layers: int = 3, family: str = FAMILIES[0]):
    """A tiny config with MoE++ on (one zero, one copy, two constant experts) or off, initialised by PithTrain
    (seed 0)."""
    from pithtrain.config import model_classes

    sets = [f"model.num_hidden_layers={layers}"]
    if moepp:
        sets += [f"{PREFIX}{k}={v}" for k, v in TINY_MOEPP.items()] + [f"{PREFIX}gating_residual={str(residual).lower()}"]
    cfg = _config(family, sets)
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    model.ate_load = None
    return model


def moe_layers(model) -> list:
    return [layer.mlp for layer in model.layers.values() if hasattr(layer.mlp, "gate")]


def residual_params(model) -> list:
    return [m.gate.residual_weight for m in moe_layers(model)]


def load_state(dst, src) -> tuple[list, list]:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert all(k.endswith("residual_weight") for k in unexpected), unexpected
    return list(missing), list(unexpected)


def logits_and_loss(model, tokens: torch.Tensor, labels: torch.Tensor):
    """(logits, the training loss: cross entropy + aux loss); the model's expert_load is added to its count."""
    out = model(tokens, labels=labels, return_logits=True)
    load = out.expert_load.detach()
    model.ate_load = load if model.ate_load is None else model.ate_load + load
    return out.logits, out.loss + out.aux_loss


def router_trace(model, tokens: torch.Tensor) -> list:
    """Per MoE layer in call order (which must be the layers' order): (router input, logits, W, R or None)."""
    seen = []

    def hook(module, args, kwargs, out):
        r = getattr(module, "residual_weight", None)
        seen.append(((args[0] if args else kwargs["x"]).detach(), out.logits.detach(), module.weight.detach(),
                     None if r is None else r.detach(), module))  # fmt: skip

    gates = [m.gate for m in moe_layers(model)]
    hooks = [g.register_forward_hook(hook, with_kwargs=True) for g in gates]
    try:
        model(tokens, labels=tokens.roll(-1, dims=1))
    finally:
        for h in hooks:
            h.remove()
    assert [s[-1] for s in seen] == gates, "the routers ran out of layer order"
    return [s[:-1] for s in seen]


def model_grads(model, kind: str) -> list:
    return [grads(m).get(kind) for m in moe_layers(model)]


def model_load(model) -> torch.Tensor:
    """[MoE layers, N] tokens per choice, from the models' own expert_load since the last reset_load."""
    return model.ate_load


def reset_load(model) -> None:
    model.ate_load = None


def checkpointed(model) -> None:
    model.activation_checkpointing = True


# ---- end to end ----


def train(ws: Path, out: Path, steps: int) -> tuple[list, str]:
    """A short CPU run of the tiny DeepSeek config with every MoE++ option on through `python -m pithtrain.train`
    (4 x 64 tokens per micro-batch); its metrics rows must log the load balance of both MoE layers."""
    sets = {**{PREFIX + k: v for k, v in TINY_MOEPP.items()}, PREFIX + "gating_residual": "true",
            "train.steps": steps, "train.micro_batch_size": 4, "train.seq_len": 64, "train.log_every": 5,
            "train.eval_batches": 1, "checkpoint.enabled": "false", "train.run_dir": out}  # fmt: skip
    cmd = [sys.executable, "-m", "pithtrain.train", "--config", str(Path(os.environ["ATE_BASE"]) / "configs" /
           f"{FAMILIES[0]}.toml")] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    rows = fp.rows(out / "metrics.jsonl", missing_ok=True)
    assert all(len(row.get("load_cv", ())) == 2 for row in rows), "metrics rows lack load_cv of both MoE layers"
    return rows, r.stderr[-1500:] if r.returncode else ""


def dump_pristine(base: Path, out: Path) -> dict:
    """Both tiny models of the pristine framework, MoE++ off (dump.py): shapes, logits, losses, expert load and
    gradients."""
    return fp.pithtrain_dump(base, out)


def dump(out: Path) -> dict:
    """The same from the workspace (dump.py in a process of its own, as for the pristine one)."""
    return fp.pithtrain_dump(Path(os.environ["ATE_WS"]), out)
