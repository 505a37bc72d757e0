"""Oracle of operate/collect-routing-trace on Megatron-Core: ate_run.pretrain_gpt's main, unchanged, with each
step's routing recorded by a forward hook on Megatron's TopKRouter (dense probs and a routing map over the
[seq x batch] tokens), written after the step as traces/step_{k:04d}.npz [MoE layers, sequences, seq, top_k].

The small config on a GPU (the tiny one with the entry's CPU emulation, for tests), 4 steps into runs/trace, a
checkpoint after every step without optimizer state (model weights are what the routing is recomputed from).
"""

import sys
from pathlib import Path

import ate_run.pretrain_gpt as pg
import numpy as np
import torch

OUT = Path("traces")
routes = []  # (probs, routing_map) of each router call of this step's training forwards, in call order


def keep_route(module, args, output):
    if isinstance(module, pg.ROUTER_CLASS) and torch.is_grad_enabled():
        routes.append((output[0].detach(), output[1].detach()))


def train_step(model, optimizer, scheduler, batches, _inner=pg.train_step):
    routes.clear()
    result = _inner(model, optimizer, scheduler, batches)
    layers = len(routes) // len(batches)
    ids, weights = [], []
    for m, (x, _) in enumerate(batches):  # micro-batch m ran router calls m*layers .. (m+1)*layers - 1
        b, s = x.shape
        step_ids, step_weights = [], []
        for probs, routing_map in routes[m * layers:(m + 1) * layers]:
            k = int(routing_map[0].sum())
            chosen = routing_map.view(s, b, -1).transpose(0, 1)  # tokens are seq-major: [b, s, experts]
            expert_ids = chosen.to(torch.int8).topk(k, dim=-1).indices
            step_ids.append(expert_ids)
            step_weights.append(probs.view(s, b, -1).transpose(0, 1).float().gather(-1, expert_ids))
        ids.append(torch.stack(step_ids))
        weights.append(torch.stack(step_weights))
    train_step.step += 1
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / f"step_{train_step.step:04d}.npz",
             expert_ids=torch.cat(ids, dim=1).cpu().numpy().astype(np.int32),
             gate_weights=torch.cat(weights, dim=1).cpu().numpy())
    return result


train_step.step = 0
pg.train_step = train_step
torch.nn.modules.module.register_module_forward_hook(keep_route)
gpu = torch.cuda.is_available()
sys.exit(pg.main(["--config", f"ate_run/{'small' if gpu else 'tiny'}.toml", "--train-iters", "4", "--out",
                  "runs/trace", "--save-interval", "1", "--no-save-optim", "--device", "cuda" if gpu else "cpu"]))
