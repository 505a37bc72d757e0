"""Megatron-Core side of the operate verifiers: with the pristine workspace's Megatron-Core and ate_run (the
baseline copy, not the agent's edits), rebuild a run's model, load its dist_checkpointing checkpoints, recompute
routing, and profile training steps of the launch entry's own train_step. The harness copies this file beside each
task's hidden tests.
"""

import sys
from pathlib import Path

from operate_lib import Fail

CONFIGS = ("tiny", "small")
SAME_TRAIN = ("micro_batch_size", "global_batch_size", "seq_length", "seed")


def use_baseline(baseline: Path):
    """Import megatron and ate_run from the pristine workspace; -> ate_run.pretrain_gpt."""
    sys.path.insert(0, str(baseline))
    import ate_run
    import megatron.core

    for mod in (megatron.core, ate_run):
        if not Path(mod.__file__).resolve().is_relative_to(baseline.resolve()):
            raise ImportError(f"{mod.__name__} was imported from {mod.__file__}, not from {baseline}")
    import ate_run.pretrain_gpt as pg

    return pg


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_config(raw: dict, baseline: Path, names=CONFIGS) -> tuple[str, dict]:
    """(name, resolved config) of the shipped ate_run/<name>.toml the run's config.json is: the same model and GPT
    tables and the same batch size, sequence length and seed."""
    import ate_run.pretrain_gpt as pg

    for name in names:
        cfg = pg.load_config(baseline / "ate_run" / f"{name}.toml")
        train = raw.get("train") or {}
        if raw.get("model") == cfg["model"] and raw.get("gpt") == cfg["gpt"] and \
                all(train.get(k) == cfg["train"][k] for k in SAME_TRAIN):
            return name, cfg
    raise Fail(f"config.json is not the {' or '.join(names)} configuration of ate_run/ (model, gpt, batch size, "
               "sequence length, seed)")


def forward_model(cfg: dict, dev: str):
    """(bare GPTModel seeded as the run's, Float16Module around it: the forward training runs) on `dev`."""
    import ate_run.pretrain_gpt as pg
    from megatron.core.transformer.module import Float16Module

    model = pg.build_model(cfg, dev)
    return model, Float16Module(model.config, model.to(dev))


def load_weights(model, path: Path) -> None:
    import ate_run.pretrain_gpt as pg

    if not (path / "metadata.json").is_file():
        raise Fail(f"no complete checkpoint at {path}")
    try:
        pg.load_checkpoint(model, path)
    except Exception as e:  # dist_checkpointing raises many kinds for a checkpoint that does not fit the model
        raise Fail(f"checkpoint {path.name} does not load into the run's model ({type(e).__name__}: {e})") from None


def loss(fmodel, x, y, dev: str, grad: bool = False) -> float:
    """Mean cross-entropy of a batch. grad=True runs the forward as training does (autograd on): Megatron's
    torch.compile'd fusions (SwiGLU) compile other kernels for it than for inference, with other bf16 rounding."""
    import torch

    x, y = x.to(dev), y.to(dev)
    positions = torch.arange(x.shape[1], device=dev).unsqueeze(0).expand_as(x)
    with torch.set_grad_enabled(grad):
        return float(fmodel(x, positions, None, labels=y).float().mean())


def routes(fmodel, x, y, dev: str):
    """(expert_ids, gate_weights, selection gap) [MoE layers, B, S, top_k] of one micro-batch's training forward;
    the gap (k-th minus (k+1)-th router score) tells near-ties where rounding may flip a choice. Megatron's router
    returns dense probs and a routing map over [seq x batch] tokens."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    seen = []
    keep = lambda mod, args, out: seen.append((mod, args[0].detach(), tuple(o.detach() for o in out)))  # noqa: E731
    hooks = [m.register_forward_hook(keep) for m in fmodel.modules() if isinstance(m, TopKRouter)]
    try:
        loss(fmodel, x, y, dev, grad=True)
    finally:
        for h in hooks:
            h.remove()
    b, s = x.shape
    ids, weights, gaps = [], [], []
    for router, hidden, (probs, routing_map) in seen:
        k = router.topk
        chosen = routing_map.view(s, b, -1).transpose(0, 1)  # tokens are seq-major
        expert_ids = chosen.to(torch.int8).topk(k, dim=-1).indices
        ids.append(expert_ids)
        weights.append(probs.view(s, b, -1).transpose(0, 1).float().gather(-1, expert_ids))
        with torch.no_grad():
            scores = router.gating(hidden).float().view(s, b, -1).transpose(0, 1).softmax(-1)
        top = scores.sort(dim=-1, descending=True).values
        gaps.append(top[..., k - 1] - top[..., k] if k < top.shape[-1] else torch.ones_like(top[..., 0]))
    return tuple(torch.stack(v).cpu().numpy() for v in (ids, weights, gaps))


def profile_steps(cfg: dict, steps: tuple[int, ...]) -> list[dict]:
    """Train the config with the pristine launch entry's parts (build_model, wrap_for_training, its data) and
    profile each of `steps`' train_step: one {CUDA kernel: (total ms, count)} per step, the GPU-side copies of
    annotated ranges left out."""
    import ate_run.pretrain_gpt as pg
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    t = cfg["train"]
    data = pg.open_data(cfg)
    model = pg.build_model(cfg, "cuda")
    model, optimizer, scheduler = pg.wrap_for_training(model, cfg, "cuda")
    tables = []
    for step in range(1, max(steps) + 1):
        batches = [next(data) for _ in range(t["global_batch_size"] // t["micro_batch_size"])]
        if step not in steps:
            pg.train_step(model, optimizer, scheduler, batches)
            continue
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pg.train_step(model, optimizer, scheduler, batches)
            torch.cuda.synchronize()
        tables.append({e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation})
    pg.teardown_world()
    return tables
