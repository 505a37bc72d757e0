"""Megatron-Core probe of feature/dynmoe: the workspace's MoELayer and TopKRouter (megatron/core/transformer/moe/)
built through its launch entry ate_run/pretrain_gpt.py, answering the shared tests in canonical terms
(test_dynmoe.py). The interface it relies on is the instruction's: TransformerConfig.moe_router_gating, the router's
`threshold`, and TopKRouter returning (probs [T, E] combine weights, routing_map [T, E] of the nonzero ones).

Also a script, run with the workspace (or the pristine copy) first on PYTHONPATH:
    python probe.py train <run dir> <steps> <config toml>   the launch entry, routers recorded
    python probe.py dump <config toml> <out.pt>              the feature-off tiny model's losses and gradients
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

KEY = "moe_router_gating"
DEVICE = fp.DEVICE
# The probe's models and run leave Megatron's torch.compile'd fusions (SwiGLU, bias-dropout-add) off: compiling
# them costs more than the tiny runs, and the feature does not touch them.
FAMILIES = ("tiny",)  # ate_run/tiny.toml
NO_FUSION = {"bias_activation_fusion": False, "bias_dropout_fusion": False}


def package_root() -> Path:
    import megatron.core

    return Path(megatron.core.__file__).resolve().parent.parent.parent


class Layer:
    """The MoELayer of the tiny config's layer spec at the test's shapes (fp32, SequentialMLP experts, no aux or z
    loss, eval mode), gating "top_any" or None (the framework's default)."""

    def __init__(self, hidden: int, inter: int, experts: int, shared: int, gating):
        from megatron.core.transformer.spec_utils import build_module

        pg = fp.megatron_entry()
        cfg = fp.megatron_tiny()
        model = cfg["model"]
        model.update(hidden_size=hidden, moe_ffn_hidden_size=inter, num_moe_experts=experts, bf16=False,
                     params_dtype=torch.float32, pipeline_dtype=torch.float32, moe_router_load_balancing_type="none",
                     moe_aux_loss_coeff=0.0, bias_activation_fusion=False,
                     moe_shared_expert_intermediate_size=shared * inter or None)  # fmt: skip
        if gating:
            model[KEY] = gating
        config = pg.model_config(cfg, DEVICE)
        spec = pg.layer_specs(config, "local").layer_specs[1].submodules.mlp
        self.moe = build_module(spec, config=config).to(DEVICE).float().eval()
        self.n, self.inter = experts, inter

    def _named(self) -> dict:
        return dict(self.moe.named_parameters())

    def shapes(self) -> dict:
        p, n, i = self._named(), self.n, self.inter
        out = {"gate.weight": tuple(p["router.weight"].shape)}
        if "router.threshold" in p:
            out["gate.threshold"] = tuple(p["router.threshold"].shape)
        fc1, fc2 = (
            p["experts.local_experts.0.linear_fc1.weight"],
            p["experts.local_experts.0.linear_fc2.weight"],
        )
        out |= {"experts.w_gate": (n, fc1.shape[1], fc1.shape[0] // 2), "experts.w_up": (n, fc1.shape[1], i),
                "experts.w_down": (n, fc2.shape[1], fc2.shape[0])}  # fmt: skip
        if "shared_experts.linear_fc1.weight" in p:
            s1, s2 = p["shared_experts.linear_fc1.weight"], p["shared_experts.linear_fc2.weight"]
            out |= {"shared.w_gate": (s1.shape[1], s1.shape[0] // 2), "shared.w_up": (s1.shape[1], s1.shape[0] // 2),
                    "shared.w_down": (s2.shape[1], s2.shape[0])}  # fmt: skip
        known = re.compile(
            r"router\.(weight|threshold)|(experts\.local_experts\.\d+|shared_experts)\.linear_fc[12]\.weight"
        )
        return out | {f"other:{k}": tuple(v.shape) for k, v in p.items() if not known.fullmatch(k)}

    def load(self, params: dict) -> None:
        """Canonical values into Megatron's layout: linear_fc1 = [gate; up] rows [2I, H], linear_fc2 [H, I]."""
        p, i = self._named(), self.inter
        with torch.no_grad():
            p["router.weight"].copy_(params["gate.weight"])
            p["router.threshold"].copy_(params["gate.threshold"])
            for e in range(self.n):
                fc1 = p[f"experts.local_experts.{e}.linear_fc1.weight"]
                fc1[:i].copy_(params["experts.w_gate"][e].T)
                fc1[i:].copy_(params["experts.w_up"][e].T)
                p[f"experts.local_experts.{e}.linear_fc2.weight"].copy_(params["experts.w_down"][e].T)
            if "shared.w_gate" in params:
                s1, s = p["shared_experts.linear_fc1.weight"], params["shared.w_gate"].shape[1]
                s1[:s].copy_(params["shared.w_gate"].T)
                s1[s:].copy_(params["shared.w_up"].T)
                p["shared_experts.linear_fc2.weight"].copy_(params["shared.w_down"].T)

    def route(self, x):
        """(combine weights [T, E], (token, expert) pairs per expert [E]) of the router; tokens as [T, 1, H]."""
        with torch.no_grad():
            probs, routing_map = self.moe.router(x.to(DEVICE).view(x.shape[0], 1, -1))
        return probs.float().cpu(), routing_map.long().sum(0).cpu()

    def forward(self, x):
        y, _ = self.moe(x.to(DEVICE).view(x.shape[0], 1, -1))
        return y.view(x.shape)

    def grads(self) -> dict:
        g = {k: (None if p.grad is None else p.grad.detach().cpu()) for k, p in self._named().items()}
        i, out = self.inter, {"gate.weight": g["router.weight"], "gate.threshold": g.get("router.threshold")}
        fc1 = [g[f"experts.local_experts.{e}.linear_fc1.weight"] for e in range(self.n)]
        fc2 = [g[f"experts.local_experts.{e}.linear_fc2.weight"] for e in range(self.n)]
        if all(t is not None for t in fc1 + fc2):
            out["experts.w_gate"] = torch.stack([t[:i].T for t in fc1])
            out["experts.w_up"] = torch.stack([t[i:].T for t in fc1])
            out["experts.w_down"] = torch.stack([t.T for t in fc2])
        s1, s2 = g.get("shared_experts.linear_fc1.weight"), g.get("shared_experts.linear_fc2.weight")
        if s1 is not None and s2 is not None:
            s = s1.shape[0] // 2
            out |= {"shared.w_gate": s1[:s].T, "shared.w_up": s1[s:].T, "shared.w_down": s2.T}
        return out


def configured_gating(value):
    """The gating the TransformerConfig of the tiny config carries (value None: the [model] key unset)."""
    pg = fp.megatron_entry()
    cfg = fp.megatron_tiny(None if value is None else {"model": {KEY: value}})
    return getattr(pg.model_config(cfg, "meta"), KEY, "top_k")


def config_error(value) -> str | None:
    """The one-line error the launch entry's config check gives for a bad gating value (None: accepted)."""
    try:
        configured_gating(value)
    except ValueError as e:  # ate_run's ConfigError is one
        return f"{type(e).__name__}: {e}"
    return None


def _forward_model(cfg: dict):
    """(bare GPTModel, Float16Module around it: the forward training runs), as the launch entry builds them."""
    from megatron.core.transformer.module import Float16Module

    pg = fp.megatron_entry()
    model = pg.build_model(cfg, DEVICE)
    return model, Float16Module(model.config, model.to(DEVICE))


def _batch():
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return x, x.roll(-1, dims=1), torch.arange(32, device=DEVICE).unsqueeze(0).expand_as(x)


def tiny_model(family: str = "tiny") -> dict:
    """The tiny config with [model] moe_router_gating = "top_any": a training forward and backward on fixed tokens,
    in canonical terms."""
    from megatron.core.transformer.moe.router import TopKRouter

    model, fmodel = _forward_model(fp.megatron_tiny({"model": {KEY: "top_any", **NO_FUSION}}))
    routers = [(name, m) for name, m in model.named_modules() if isinstance(m, TopKRouter)]
    thresholds = {name: m.threshold.detach().float().cpu().clone() for name, m in routers}
    pairs = []
    hooks = [
        m.register_forward_hook(lambda mod, a, out: pairs.append(int((out[0] > 0).sum()))) for _, m in routers
    ]
    x, y, pos = _batch()
    loss = fmodel(x, pos, None, labels=y).float().mean()
    for h in hooks:
        h.remove()
    loss.backward()
    return {"loss": loss.item(), "thresholds": thresholds, "pairs": pairs, "tokens": x.numel(),
            "threshold_grads": {name: m.threshold.grad for name, m in routers}}  # fmt: skip


def train(run: Path, steps: int):
    """A short run of the tiny config with top-any gating through `python -m ate_run.pretrain_gpt` (batch 4 x 64
    tokens). -> (metrics.jsonl rows, per optimizer step the mean number of nonzero-weight experts per token of each
    MoE layer, from the router outputs of the run)."""
    ws, base = Path(os.environ["ATE_WS"]), Path(os.environ["ATE_BASE"])
    run.mkdir(parents=True)
    args = [sys.executable, __file__, "train", run / "out", steps, base / "ate_run" / "tiny.toml"]
    with open(run / "train.log", "w") as log:
        r = subprocess.run(
            list(map(str, args)), cwd=ws, env=fp.child_env(ws), stdout=log, stderr=subprocess.STDOUT, timeout=400
        )
    assert r.returncode == 0, (run / "train.log").read_text()[-2000:]
    rows = fp.rows(run / "out" / "metrics.jsonl")
    calls = json.loads((run / "routers.json").read_text())  # [pairs, tokens] per router call, in call order
    seen = [[p / t for p, t in calls[i : i + 2]] for i in range(0, len(calls), 2)]
    return rows, seen


def dump_pristine(base: Path, out: Path) -> dict:
    """dump() of the pristine framework, in a process with it first on PYTHONPATH."""
    return fp.dump_pristine(__file__, [base / "ate_run" / "tiny.toml", out], base, out, cwd=base)


# ---- script side ----


def _train_main(out: str, steps: str, toml: str) -> None:
    """The launch entry's main in this process on a copy of the config with top-any gating, batch 4 x 64 and
    NO_FUSION, each training router call recorded."""
    import runpy

    from megatron.core.transformer.moe.router import TopKRouter

    extra = "".join(f"{k} = {str(v).lower()}\n" for k, v in NO_FUSION.items())
    text = fp.small_batch(Path(toml).read_text(), f'{KEY} = "top_any"\n{extra}')
    config = Path(out).parent / "tiny-top-any.toml"
    config.write_text(text)
    calls = []

    def record(module, args, result):
        if isinstance(module, TopKRouter) and torch.is_grad_enabled():
            calls.append([int((result[0] > 0).sum()), result[0].shape[0]])

    torch.nn.modules.module.register_module_forward_hook(record)
    sys.argv = ["ate_run.pretrain_gpt", "--config", str(config), "--train-iters", steps, "--out", out,
                "--device", DEVICE, "--no-save-optim"]  # fmt: skip
    try:
        runpy.run_module("ate_run.pretrain_gpt", run_name="__main__", alter_sys=True)
    finally:
        (Path(out).parent / "routers.json").write_text(json.dumps(calls))


def dump(toml: Path | None = None) -> dict:
    """The feature-off tiny model (the config as shipped, in fp32 with fusions off: Megatron's bf16 MoE forward is
    not deterministic on a GPU) of the framework on the path: its state shapes, and the per-token losses and
    gradients of a training forward and backward on fixed tokens."""
    pg = fp.megatron_entry()
    toml = toml or Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml"
    cfg = pg.load_config(toml, {"device": DEVICE, "model": NO_FUSION})
    cfg["model"].update(bf16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32)
    model = pg.build_model(cfg, DEVICE).to(DEVICE)
    x, y, pos = _batch()
    losses = model(x, pos, None, labels=y).float()
    losses.mean().backward()
    return {"tiny": {"shapes": {k: tuple(p.shape) for k, p in model.state_dict().items() if hasattr(p, "shape")},
            "logits": losses.detach().cpu(), "loss": losses.mean().detach().cpu(),
            "grads": {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.grad is not None}}}  # fmt: skip


def _dump_main(toml: str, out: str) -> None:
    torch.save(dump(Path(toml)), out)


if __name__ == "__main__":
    {"train": _train_main, "dump": _dump_main}[sys.argv[1]](*sys.argv[2:])
