"""PithTrain probe of feature/dynmoe: the workspace's MoE (pithtrain/models/blocks.py), configs and trainer,
answering the shared tests in canonical terms (test_dynmoe.py). The interface it relies on is the instruction's:
RouterConfig.gating (model.router.gating), MoE.gate's `threshold`, and MoE.gate returning a RouterOutput.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

KEY = "model.router.gating"
FAMILIES = ("tiny-deepseek-v2-lite", "tiny-qwen3-moe")  # both model families' tiny configs


def package_root() -> Path:
    import pithtrain

    return Path(pithtrain.__file__).resolve().parent.parent


def _config(name: str, sets=()):
    from pithtrain.config import load_config

    return load_config(Path(os.environ["ATE_BASE"]) / "configs" / f"{name}.toml", list(sets))


def dense(route, n: int) -> torch.Tensor:
    """The route's combine weights as [T, E] (sum over slots naming the same expert)."""
    out = torch.zeros(route.expert_ids.shape[0], n)
    return out.scatter_add(1, route.expert_ids, route.gate_weights.float()).detach()


class Layer:
    """pithtrain.models.blocks.MoE at the test's shapes, gating "top_any" or None (the framework's default)."""

    def __init__(self, hidden: int, inter: int, experts: int, shared: int, gating):
        from pithtrain.models.blocks import MoE, RouterConfig

        kw = {"gating": gating} if gating else {}
        self.moe = MoE(
            hidden, inter, RouterConfig(num_experts=experts, top_k=2, **kw), num_shared_experts=shared
        )
        self.n, self.inter = experts, inter

    def _params(self) -> dict:
        """canonical name -> (PithTrain parameter, to-canonical view); other parameters under their own names."""
        named, i = dict(self.moe.named_parameters()), self.inter
        t = lambda p: p.transpose(-2, -1)  # noqa: E731  (nn.Linear stores [out, in])
        table = {
            "gate.weight": ("gate.weight", lambda p: p),
            "gate.threshold": ("gate.threshold", lambda p: p),
            "experts.w_gate": ("experts.w_gate_up", lambda p: p[..., :i]),
            "experts.w_up": ("experts.w_gate_up", lambda p: p[..., i:]),
            "experts.w_down": ("experts.w_down", lambda p: p),
            "shared.w_gate": ("shared_experts.gate_proj.weight", t),
            "shared.w_up": ("shared_experts.up_proj.weight", t),
            "shared.w_down": ("shared_experts.down_proj.weight", t),
        }
        out = {k: (named[name], view) for k, (name, view) in table.items() if name in named}
        known = {name for name, _ in table.values()}
        return out | {f"other:{k}": (p, lambda p: p) for k, p in named.items() if k not in known}

    def shapes(self) -> dict:
        return {k: tuple(view(p).shape) for k, (p, view) in self._params().items()}

    def load(self, params: dict) -> None:
        with torch.no_grad():
            for k, (p, view) in self._params().items():
                view(p).copy_(params[k])

    def route(self, x):
        with torch.no_grad():
            route = self.moe.gate(x)
        assert route.expert_ids.shape == route.gate_weights.shape and route.expert_ids.shape[0] == x.shape[0]
        assert route.expert_ids.min() >= 0 and route.expert_ids.max() < self.n
        return dense(route, self.n), route.load

    def forward(self, x):
        y, _ = self.moe(x.view(1, *x.shape))
        return y.view(x.shape)

    def grads(self) -> dict:
        return {
            k: None if p.grad is None else view(p.grad).detach() for k, (p, view) in self._params().items()
        }


def configured_gating(value):
    """The gating both tiny configs carry after PithTrain's load_config (value None: the key unset)."""
    got = {
        _config(name, [] if value is None else [f'{KEY}="{value}"']).model.router.gating for name in FAMILIES
    }
    assert len(got) == 1, got
    return got.pop()


def config_error(value) -> str | None:
    """The one-line errors of RouterConfig.validate and of load_config for a bad gating value (None: either
    accepted it)."""
    from pithtrain.config import ConfigError
    from pithtrain.models.blocks import RouterConfig

    try:
        RouterConfig(gating=value).validate()
        return None
    except ValueError as e:
        first = str(e)
    try:
        configured_gating(value)
        return None
    except ConfigError as e:
        return f"{first}; {e}" if KEY in first else first


def tiny_model(family: str = FAMILIES[0]) -> dict:
    """A tiny config with top-any gating: a forward and backward on fixed tokens, in canonical terms (the pairs
    per MoE layer from the model's own expert_load)."""
    from pithtrain.config import model_classes

    cfg = _config(family, [f'{KEY}="top_any"'])
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    thresholds = {k: p.detach().clone() for k, p in model.named_parameters() if k.endswith("gate.threshold")}
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    out = model(x, labels=x.roll(-1, dims=1))
    (out.loss + out.aux_loss).backward()
    assert out.expert_load.shape[1] == 8, out.expert_load.shape
    grads = {k: p.grad for k, p in model.named_parameters() if k.endswith("gate.threshold")}
    return {"loss": out.loss.item(), "thresholds": thresholds, "pairs": out.expert_load.sum(1).tolist(),
            "tokens": x.numel(), "threshold_grads": grads}  # fmt: skip


def train(run: Path, steps: int):
    """A short CPU run of the tiny DeepSeek config with top-any gating through `python -m pithtrain.train`
    (4 x 64 tokens per micro-batch). -> (metrics.jsonl rows, per optimizer step the mean number of nonzero-weight
    experts per token of each MoE layer, from the RouterOutputs of the run's training forwards)."""
    ws = Path(os.environ["ATE_WS"])
    sets = {KEY: '"top_any"', "train.steps": steps, "train.micro_batch_size": 4, "train.seq_len": 64,
            "train.log_every": 5, "train.eval_batches": 1, "checkpoint.enabled": "false", "train.run_dir": run}  # fmt: skip
    args = [sys.executable, __file__, "train", run, "--config", Path(os.environ["ATE_BASE"]) / "configs" /
            f"{FAMILIES[0]}.toml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(list(map(str, args)), cwd=ws, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = fp.rows(run / "metrics.jsonl")
    accum = json.loads((run / "config.json").read_text())["train"]["grad_accum"]
    calls = json.loads((run.parent / "routers.json").read_text())  # [pairs, tokens] per router call
    per_step = 2 * accum  # two MoE layers per forward
    seen = []
    for i in range(0, len(calls), per_step):
        step = calls[i : i + per_step]
        seen.append([sum(p for p, _ in step[j::2]) / sum(t for _, t in step[j::2]) for j in range(2)])
    return rows, seen


def dump_pristine(base: Path, out: Path) -> dict:
    """Both tiny models of the pristine framework, feature off (dump.py): shapes, logits, losses, expert load and
    gradients."""
    return fp.pithtrain_dump(base, out)


def dump() -> dict:
    """The same from the workspace (dump.py in a process of its own, as for the pristine one)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"dynmoe-ws-{os.getpid()}.pt"
    try:
        return fp.pithtrain_dump(Path(os.environ["ATE_WS"]), out)
    finally:
        out.unlink(missing_ok=True)


def _train_main(run: str, *args: str) -> None:
    """pithtrain.train in this process, each training forward's RouterOutput recorded (pairs with a nonzero weight,
    tokens) into routers.json beside the run folder."""
    import runpy

    calls = []

    def record(module, inputs, out):
        if type(out).__name__ == "RouterOutput" and torch.is_grad_enabled():
            calls.append([int((dense(out, module.cfg.num_experts) > 0).sum()), out.expert_ids.shape[0]])

    torch.nn.modules.module.register_module_forward_hook(record)
    sys.argv = ["pithtrain.train", *args]
    try:
        runpy.run_module("pithtrain.train", run_name="__main__", alter_sys=True)
    finally:
        (Path(run).parent / "routers.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    {"train": _train_main}[sys.argv[1]](*sys.argv[2:])
