"""Oracle of operate/collect-routing-trace on PithTrain: pithtrain.train, unchanged, with each step's routing
recorded (one process: each Python start imports torch, which takes tens of seconds in some sandboxes).

A global forward hook on the MoE layers keeps every RouterOutput of a training forward (grad enabled: the
final held-out evaluation runs without), and wrapping the loop's `forward_backward` marks step boundaries, so
after each step its micro-batches' routes go to traces/step_{k:04d}.npz as [moe layers, batch, seq, top_k].
Checkpoints: every step; on CPU all four kept (so the verifier recomputes every step), on a GPU the newest two
(steps 3 and 4), weights only: the small config's AdamW state would add ~18 GB to each, and the verifier reads
weights alone.
"""

import sys
from pathlib import Path

import numpy as np
import torch

import pithtrain.train as train
from pithtrain.models.blocks import MoE

OUT = Path("traces")
routes: list[tuple] = []  # (batch size, RouterOutput) of each MoE forward of this step, in call order


def keep_route(module, args, output):
    if isinstance(module, MoE) and torch.is_grad_enabled():
        routes.append((args[0].shape[0], output[1]))


def step_with_trace(model, batches, par, device, amp_dtype, _inner=train.forward_backward):
    routes.clear()
    result = _inner(model, batches, par, device, amp_dtype)
    layers = len(routes) // len(batches)
    ids, weights = [], []
    for m in range(len(batches)):  # micro-batch m ran layers m*layers .. (m+1)*layers - 1
        mine = routes[m * layers:(m + 1) * layers]
        ids.append(torch.stack([r.expert_ids.view(b, -1, r.expert_ids.shape[-1]) for b, r in mine]))
        weights.append(torch.stack([r.gate_weights.view(b, -1, r.gate_weights.shape[-1]) for b, r in mine]))
    step_with_trace.step += 1
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / f"step_{step_with_trace.step:04d}.npz",
             expert_ids=torch.cat(ids, dim=1).cpu().numpy().astype(np.int32),
             gate_weights=torch.cat(weights, dim=1).detach().float().cpu().numpy())
    return result


step_with_trace.step = 0
if torch.cuda.is_available():
    config, extra = "small", ["checkpoint.enabled=true", "checkpoint.weights_only=true", "checkpoint.keep=2"]
else:
    torch.set_num_threads(1)  # the tiny model gains nothing from more threads; a shared CPU thrashes
    config, extra = "tiny", ["checkpoint.keep=4"]
torch.nn.modules.module.register_module_forward_hook(keep_route)
train.forward_backward = step_with_trace
sets = [a for s in ["train.steps=4", "train.run_dir=runs/trace", "checkpoint.every=1", *extra] for a in ("--set", s)]
sys.exit(train.main(["--config", f"configs/{config}-deepseek-v2-lite.toml", *sets]))
