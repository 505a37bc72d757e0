"""TorchTitan probe of feature/dynmoe: the workspace's MoE (torchtitan/models/moe/moe.py) and its deepseek_v2_lite
train spec (ate_run/), answering the shared tests in canonical terms (test_dynmoe.py). The interface it relies on
is the instruction's: MoEArgs.gating, the router's `threshold`, the job-config key model.moe_gating, and
TokenChoiceTopKRouter returning (top_scores [T, k], selected_experts_indices [T, k], num_tokens_per_expert [E]).

Also a script, run with the workspace (or the pristine copy) first on PYTHONPATH:
    python probe.py train <run dir> <steps> <config toml>   the launch entry (torchtitan.train), routers recorded
    python probe.py dump <config toml> <out.pt>              the feature-off tiny model's outputs and gradients
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # feature_probe.py (verify_lib), beside the tests
import feature_probe as fp  # noqa: E402

KEY = "model.moe_gating"
DEVICE = fp.DEVICE
SEED = 0
FAMILIES = ("tiny",)  # the train spec's tiny flavor


fp.torchtitan_cpu_histc()


def package_root() -> Path:
    import torchtitan

    return Path(torchtitan.__file__).resolve().parent.parent


def dense(top_scores, selected, n: int) -> torch.Tensor:
    """A router's slot weights as combine weights [T, E] (the sum over slots naming the same expert)."""
    out = torch.zeros(selected.shape[0], n, device=selected.device)
    return out.scatter_add(1, selected.long(), top_scores.float()).detach().cpu()


class Layer:
    """torchtitan.models.moe.moe.MoE at the test's shapes (fp32, the experts' for-loop path), gating "top_any" or
    None (the framework's default)."""

    def __init__(self, hidden: int, inter: int, experts: int, shared: int, gating):
        from torchtitan.models.moe.moe import MoE, MoEArgs

        kw = {"gating": gating} if gating else {}
        args = MoEArgs(num_experts=experts, num_shared_experts=shared, top_k=2, score_func="softmax",
                       route_norm=False, score_before_experts=False, use_grouped_mm=False, load_balance_coeff=None,
                       **kw)  # fmt: skip
        self.n = experts
        self.moe = MoE(args, dim=hidden, hidden_dim=inter).to(DEVICE)

    def _params(self) -> dict:
        """canonical name -> (framework parameter, to-canonical view)."""
        named = dict(self.moe.named_parameters())
        t = lambda p: p.transpose(-2, -1)  # noqa: E731  (TorchTitan stores [out, in])
        table = {
            "gate.weight": ("router.gate.weight", lambda p: p),
            "gate.threshold": ("router.threshold", lambda p: p),
            "experts.w_gate": ("experts.w1", t),
            "experts.w_up": ("experts.w3", t),
            "experts.w_down": ("experts.w2", t),
            "shared.w_gate": ("shared_experts.w1.weight", t),
            "shared.w_up": ("shared_experts.w3.weight", t),
            "shared.w_down": ("shared_experts.w2.weight", t),
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
        """(combine weights [T, E], (token, expert) pairs per expert [E]) of the router."""
        with torch.no_grad():
            top_scores, selected, counts = self.moe.router(x.to(DEVICE), self.moe.expert_bias)
        return dense(top_scores, selected, self.n), counts.detach().cpu().round().long()

    def forward(self, x):
        return self.moe(x.to(DEVICE).view(1, *x.shape)).view(x.shape)

    def grads(self) -> dict:
        return {
            k: None if p.grad is None else view(p.grad).detach().cpu()
            for k, (p, view) in self._params().items()
        }


def _spec_model(config):
    """The train spec's model for a job config, initialised by TorchTitan's init_weights, fp32, on DEVICE."""
    import ate_run.deepseek_v2_lite  # noqa: F401  (registers the train spec)
    from torchtitan.protocols import train_spec

    spec = train_spec.get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    torch.manual_seed(SEED)
    with torch.device(DEVICE), torch.no_grad():
        model = spec.model_cls(args)
        model.init_weights(buffer_device=torch.device(DEVICE))
    return model


def _job_config(extra: list[str], toml: Path | None = None):
    from torchtitan.config import ConfigManager

    toml = toml or Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml"
    return ConfigManager().parse_args(["--job.config_file", str(toml), *extra])


def configured_gating(value):
    """The gating the tiny flavor's model args carry after TorchTitan parses the job config (value None: unset)."""
    import ate_run.deepseek_v2_lite  # noqa: F401
    from torchtitan.protocols import train_spec

    config = _job_config([] if value is None else ["--" + KEY, value])
    args = copy.deepcopy(train_spec.get_train_spec(config.model.name).model_args[config.model.flavor])
    args.update_from_config(config)
    return getattr(args.moe_args, "gating", "top_k")


def config_error(value) -> str | None:
    """The one-line error the config path gives for a bad gating value (None: accepted)."""
    try:
        configured_gating(value)
    except (ValueError, SystemExit) as e:
        return f"{type(e).__name__}: {e}"
    return None


def tiny_model(family: str = "tiny") -> dict:
    """The tiny flavor with --model.moe_gating top_any: a forward and backward on fixed tokens, in canonical terms."""
    from torchtitan.models.moe.moe import TokenChoiceTopKRouter

    model = _spec_model(_job_config(["--" + KEY, "top_any"]))
    routers = [(name, m) for name, m in model.named_modules() if isinstance(m, TokenChoiceTopKRouter)]
    thresholds = {name: m.threshold.detach().cpu().clone() for name, m in routers}
    pairs = []
    hooks = [m.register_forward_hook(lambda mod, a, out: pairs.append(int((dense(out[0], out[1], 8) > 0).sum())))
             for _, m in routers]  # fmt: skip
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits = model(x)
    for h in hooks:
        h.remove()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.roll(-1, dims=1).flatten())
    loss.backward()
    return {"loss": loss.item(), "thresholds": thresholds, "pairs": pairs, "tokens": x.numel(),
            "threshold_grads": {name: m.threshold.grad for name, m in routers}}  # fmt: skip


def _run(args: list, cwd: Path, root: Path, log: Path, timeout: int) -> subprocess.CompletedProcess:
    """This file as a script under $PYTHON (in CI a wrapper that makes TorchTitan train on CPU) or this interpreter,
    with `root` first on PYTHONPATH."""
    python = os.environ.get("PYTHON") or sys.executable
    with open(log, "w") as out:
        return subprocess.run([python, __file__, *map(str, args)], cwd=cwd, env=fp.child_env(root), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip


def train(run: Path, steps: int):
    """A short run of the tiny config with top-any gating through torchtitan.train (batch 4 x 64 tokens).
    -> (metrics.jsonl rows, per optimizer step the mean number of nonzero-weight experts per token of each MoE
    layer, from the router outputs of the run)."""
    ws, base = Path(os.environ["ATE_WS"]), Path(os.environ["ATE_BASE"])
    run.mkdir(parents=True)
    r = _run(["train", run, steps, base / "ate_run" / "tiny.toml"], ws, ws, run / "train.log", 400)
    assert r.returncode == 0, (run / "train.log").read_text()[-2000:]
    rows = fp.rows(run / "metrics.jsonl")
    calls = json.loads((run / "routers.json").read_text())  # [pairs, tokens] per router call, in call order
    layers = 2
    seen = [[p / t for p, t in calls[i : i + layers]] for i in range(0, len(calls), layers)]
    return rows, seen


def dump_pristine(base: Path, out: Path) -> dict:
    """dump() of the pristine framework, in a process with it first on PYTHONPATH."""
    return fp.dump_pristine(__file__, [base / "ate_run" / "tiny.toml", out], base, out, cwd=base)


# ---- script side ----


def _train_main(run: str, steps: str, toml: str) -> None:
    """torchtitan.train in this process (a world of one unless torchrun set one), each router call recorded."""
    import runpy

    # before torchtitan is imported: its ConfigManager.parse_args takes sys.argv[1:] as a default at import time
    sys.argv = ["torchtitan.train", "--job.config_file", toml, "--" + KEY, "top_any", "--training.steps", steps,
                "--training.local_batch_size", "4", "--training.global_batch_size", "4", "--training.seq_len", "64",
                "--metrics.log_freq", "1", "--job.dump_folder", run]  # fmt: skip
    from torchtitan.models.moe.moe import TokenChoiceTopKRouter

    calls = []

    def record(module, args, out):
        if isinstance(module, TokenChoiceTopKRouter) and torch.is_grad_enabled():
            calls.append([int((dense(out[0], out[1], module.num_experts) > 0).sum()), out[1].shape[0]])

    torch.nn.modules.module.register_module_forward_hook(record)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    try:
        runpy.run_module("torchtitan.train", run_name="__main__", alter_sys=True)
    finally:
        (Path(run) / "routers.json").write_text(json.dumps(calls))


def dump(toml: Path | None = None) -> dict:
    """The feature-off tiny model (the config as shipped) of the framework on the path: its state shapes, and the
    logits, loss and gradients of a forward and backward on fixed tokens."""
    model = _spec_model(_job_config([], toml))
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.roll(-1, dims=1).flatten())
    loss.backward()
    return {"tiny": {"shapes": {k: tuple(p.shape) for k, p in model.state_dict().items()},
            "logits": logits.detach().cpu(), "loss": loss.detach().cpu(),
            "grads": {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}}}  # fmt: skip


def _dump_main(toml: str, out: str) -> None:
    torch.save(dump(Path(toml)), out)


if __name__ == "__main__":
    {"train": _train_main, "dump": _dump_main}[sys.argv[1]](*sys.argv[2:])
