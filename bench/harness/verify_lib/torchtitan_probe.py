"""TorchTitan side of the operate verifiers: with the pristine workspace's TorchTitan and ate_run (the baseline
copy, not the agent's edits), rebuild a run's model, load its DCP checkpoints, recompute routing, and profile
training steps of TorchTitan's own Trainer. The harness copies this file beside each task's hidden tests.
"""

import contextlib
import copy
import os
import socket
import sys
import tempfile
import tomllib
from pathlib import Path

from operate_lib import Fail

SPEC = "deepseek_v2_lite"
FLAVORS = ("tiny", "small")
SAME = {"training": ("local_batch_size", "global_batch_size", "seq_len"), "debug": ("seed",)}


def use_baseline(baseline: Path) -> None:
    """Import torchtitan and ate_run from the pristine workspace, and register its train spec."""
    sys.path.insert(0, str(baseline))
    import ate_run
    import torchtitan

    for mod in (torchtitan, ate_run):
        if not Path(mod.__file__).resolve().is_relative_to(baseline.resolve()):
            raise ImportError(f"{mod.__name__} was imported from {mod.__file__}, not from {baseline}")
    import ate_run.deepseek_v2_lite  # noqa: F401  (registers the train spec)


def run_flavor(raw: dict, baseline: Path, flavors=FLAVORS) -> str:
    """The ate_run flavor a run's config.json (TorchTitan's resolved job config) trained, checking that it is the
    configuration as shipped: its model, batch size, sequence length and seed."""
    model = raw.get("model") or {}
    flavor = model.get("flavor")
    if model.get("name") != SPEC or flavor not in flavors:
        raise Fail(f"the run is not of the {SPEC} spec's {' or '.join(flavors)} flavor (config.json model: "
                   f"{ {k: model.get(k) for k in ('name', 'flavor')} })")
    shipped = tomllib.loads((baseline / "ate_run" / f"{flavor}.toml").read_text())
    for table, keys in SAME.items():
        for key in keys:
            if (raw.get(table) or {}).get(key) != shipped[table][key]:
                raise Fail(f"config.json {table}.{key} = {(raw.get(table) or {}).get(key)!r}, but the {flavor} "
                           f"configuration has {shipped[table][key]!r}")
    return flavor


def job_config(baseline: Path, flavor: str, extra: list[str] = ()):
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--job.config_file", str(baseline / "ate_run" / f"{flavor}.toml"), *extra])


def cpu_histc(device: str) -> None:
    """TorchTitan's MoE counts tokens per expert with torch.histc on integer ids, which CUDA has and CPU lacks."""
    import torch

    if device == "cpu" and not getattr(torch.histc, "ate_cpu", False):
        histc = torch.histc
        torch.histc = lambda x, *a, **k: (histc(x, *a, **k) if x.is_floating_point()
                                         else histc(x.float(), *a, **k).to(x.dtype))  # fmt: skip
        torch.histc.ate_cpu = True


def build_model(config, device: str):
    """The spec's model for a job config, initialised by TorchTitan (buffers included), fp32, on `device`."""
    import torch
    from torchtitan.protocols import train_spec as ts

    cpu_histc(device)
    spec = ts.get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device(device), torch.no_grad():  # as the Trainer initialises
        model = spec.model_cls(args)
        model.init_weights(buffer_device=torch.device(device))
    return model, args


def load_weights(model, path: Path, args=None) -> None:
    """The model's weights (and persistent buffers) from a TorchTitan checkpoint: DCP, or the Hugging Face safetensors
    TorchTitan's exporter writes (checkpoint.last_save_in_hf; read back through the spec's state-dict adapter, which
    needs the model `args`)."""
    import torch
    import torch.distributed.checkpoint as dcp

    hf_files = sorted(path.glob("*.safetensors")) if args is not None and path.is_dir() else []
    if not (path / ".metadata").is_file() and not hf_files:
        raise Fail(f"no complete checkpoint at {path}")
    state = model.state_dict()
    try:
        if (path / ".metadata").is_file():
            with torch.no_grad():
                dcp.load(state, checkpoint_id=str(path))
        else:
            from safetensors.torch import load_file
            from torchtitan.protocols import train_spec as ts

            hf = {k: v for f in hf_files for k, v in load_file(f).items()}
            weights = ts.get_train_spec(SPEC).state_dict_adapter(args, None).from_hf(hf)
            missing = sorted(k for k, _ in model.named_parameters() if k not in weights)
            if missing:
                raise KeyError(f"no weight for {missing[0]} (and {len(missing) - 1} more)")
            state.update(weights)
        model.load_state_dict(state)
    except Exception as e:  # DCP and the adapter raise many kinds for a checkpoint that does not fit the model
        raise Fail(f"checkpoint {path.name} does not load into the run's model ({type(e).__name__}: {e})") from None


def autocast(config, device: str):
    """What TorchTitan's single-device training forward runs under: autocast to mixed_precision_param."""
    import torch

    if config.training.mixed_precision_param == config.training.dtype:
        return None
    return torch.autocast(device, dtype=getattr(torch, config.training.mixed_precision_param))


def routes(model, config, batch, device: str):
    """(expert_ids, gate_weights, selection gap) [MoE layers, B, S, top_k] of one micro-batch's forward; the gap
    (k-th minus (k+1)-th selection score, expert bias included) tells near-ties where rounding may flip a choice."""
    import torch
    import torch.nn.functional as F
    from torchtitan.models.moe.moe import TokenChoiceTopKRouter

    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out)))
             for m in model.modules() if isinstance(m, TokenChoiceTopKRouter)]
    x = batch.to(device)
    try:
        with torch.no_grad(), autocast(config, device) or contextlib.nullcontext():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    ids, weights, gaps = [], [], []
    for router, args, (top_scores, selected, _) in seen:
        with torch.no_grad(), autocast(config, device) or contextlib.nullcontext():
            scores = F.softmax(router.gate(args[0]).float(), dim=1)
        if len(args) > 1 and args[1] is not None:
            scores = scores + args[1]
        top = scores.sort(dim=-1, descending=True).values
        k = router.top_k
        gap = top[:, k - 1] - top[:, k] if k < top.shape[1] else torch.ones_like(top[:, 0])
        ids.append(selected.view(*x.shape, k))
        weights.append(top_scores.float().view(*x.shape, k))
        gaps.append(gap.view(*x.shape))
    return tuple(torch.stack(v).cpu().numpy() for v in (ids, weights, gaps))


def _single_process_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ[key] = value


def profile_steps(baseline: Path, flavor: str, extra: list[str], steps: tuple[int, ...]) -> list[dict]:
    """Train with TorchTitan's Trainer (pristine code, the run's settings `extra`) and profile each of `steps`'
    train_step (data loading, forward, backward, clipping, optimizer and LR step, metric logging): one
    {CUDA kernel: (total ms, count)} per step, the GPU-side copies of annotated ranges left out."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from torchtitan.train import Trainer

    _single_process_env()
    with tempfile.TemporaryDirectory(prefix="ate-verify-") as dump:
        # The shipped config saves no checkpoint and runs no profiler of its own.
        config = job_config(baseline, flavor, [*extra, "--training.steps", str(max(steps)), "--job.dump_folder", dump])
        trainer = Trainer(config)
        tables, inner = [], trainer.train_step

        def train_step(data_iterator):
            if trainer.step not in steps:
                return inner(data_iterator)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                inner(data_iterator)
                torch.cuda.synchronize()
            tables.append({e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                           if e.device_type == DeviceType.CUDA and not e.is_user_annotation})

        trainer.train_step = train_step
        try:
            trainer.train()
        finally:
            trainer.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return tables
