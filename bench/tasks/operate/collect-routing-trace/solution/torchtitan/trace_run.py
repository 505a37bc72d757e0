"""Oracle of operate/collect-routing-trace on TorchTitan: torchtitan.train's Trainer, unchanged, with each step's
routing recorded by forward hooks on the routers (TokenChoiceTopKRouter returns the gate weights and expert ids of
every token), written after the step as traces/step_{k:04d}.npz [MoE layers, sequences, seq, top_k].

The small flavor (a GPU is there: TorchTitan does not train on CPU), 4 steps into runs/trace. Checkpoints: TorchTitan
saves every `interval` steps with optimizer state (the small config's is ~27 GB) and the last step model-only, so
interval 3 keeps what the routing of step 4 is recomputed from, in ~36 GB of disk.
"""

import sys
from pathlib import Path

import numpy as np
import torch

flavor = "small" if torch.cuda.is_available() else "tiny"
# Before torchtitan is imported: its ConfigManager.parse_args defaults to sys.argv[1:] as of import time.
sys.argv[1:] = ["--job.config_file", f"ate_run/{flavor}.toml", "--training.steps", "4", "--job.dump_folder",
                "runs/trace", "--checkpoint.enable", "--checkpoint.interval", "3"]
from torchtitan.models.moe.moe import TokenChoiceTopKRouter  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402

OUT = Path("traces")


class TracingTrainer(Trainer):
    def __init__(self, job_config):
        super().__init__(job_config)
        self.routes, self.step_shapes = [], []
        for part in self.model_parts:
            for m in part.modules():
                if isinstance(m, TokenChoiceTopKRouter):
                    m.register_forward_hook(self.keep_route)

    def keep_route(self, module, args, output):
        if torch.is_grad_enabled():  # the training forward
            top_scores, expert_ids, _ = output
            self.routes.append((expert_ids.detach().to(torch.int32).cpu(), top_scores.detach().float().cpu()))

    def forward_backward_step(self, *, labels, **kwargs):
        self.step_shapes.append(tuple(labels.shape))
        return super().forward_backward_step(labels=labels, **kwargs)

    def train_step(self, data_iterator):
        self.routes.clear()
        self.step_shapes.clear()
        super().train_step(data_iterator)
        layers = len(self.routes) // len(self.step_shapes)
        ids, weights = [], []
        for m, (b, s) in enumerate(self.step_shapes):  # micro-batch m ran layers m*layers .. (m+1)*layers - 1
            mine = self.routes[m * layers:(m + 1) * layers]
            ids.append(torch.stack([i.view(b, s, -1) for i, _ in mine]))
            weights.append(torch.stack([w.view(b, s, -1) for _, w in mine]))
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez(OUT / f"step_{self.step:04d}.npz", expert_ids=torch.cat(ids, dim=1).numpy(),
                 gate_weights=torch.cat(weights, dim=1).numpy())


main(TracingTrainer)
