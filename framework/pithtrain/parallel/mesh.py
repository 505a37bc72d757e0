"""The layout of a distributed run: torchrun's processes arranged in one device mesh, and what lives where.

Mesh dims, outermost first: (pp, dp_replicate, efsdp, ep), with dp_shard = efsdp x ep and dp = dp_replicate x
dp_shard; ep is innermost so expert all-to-alls stay inside a node.

- Data: every dp rank (ep ranks included) reads its own micro-batches; pp ranks of one dp rank read the same.
  With the DataLoader's [accum][dp][micro_batch] layout, dp=2 x grad_accum=1 sees the tokens of dp=1 x grad_accum=2.
- Dense parameters: FSDP2 over dp_shard, HSDP (replicated over dp_replicate) when dp_replicate > 1.
- Experts: each ep rank holds num_experts/ep of them (a DTensor sharded over ep, so checkpoints see the global
  [E, ...] tensor), FSDP2 over efsdp (the dp_shard ranks holding the same experts), replicated over dp_replicate.
  Expert parallelism thus borrows ep ranks from dp_shard, as in TorchTitan: ep ranks read different tokens.
- Pipeline: each pp rank holds its stages (pipeline.py); FSDP keeps parameters gathered over the micro-batches of
  a step and reduces gradients once after the last (the overlapped schedule then runs no FSDP collectives).
A single process is the layout in which every degree is 1; nothing then touches torch.distributed.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from pithtrain.config import Config, validate_parallel
from pithtrain.models.blocks import MoE
from pithtrain.parallel.expert import ExpertParallel
from pithtrain.parallel.pipeline import Pipeline, prune, rank_stages, stage_layers


class Parallel:
    def __init__(self, cfg: Config, device: torch.device):
        """Join the process group (environment from torchrun) and build the mesh; fails fast on a bad layout."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        validate_parallel(cfg, self.world)
        self.cfg, self.p, self.device = cfg, cfg.parallel, device
        self.distributed = self.world > 1
        self.rank, self.dp_rank, self.dp_size, self.pp_rank, self.pipeline = 0, 0, 1, 0, None
        if not self.distributed:
            return
        p, cuda = self.p, device.type == "cuda"
        if cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.rank = dist.get_rank()
        # Two views of the same rank grid: dense parameters shard over dp_shard, experts over ep and efsdp.
        self.mesh = init_device_mesh(self.device.type, (p.pp, p.dp_replicate, p.dp_shard // p.ep, p.ep),
                                     mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
        self.dense_mesh = init_device_mesh(self.device.type, (p.pp, p.dp_replicate, p.dp_shard),
                                           mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
        rep, shard = self.dense_mesh["dp_replicate"], self.dense_mesh["dp_shard"]
        self.dp_rank, self.dp_size = rep.get_local_rank() * shard.size() + shard.get_local_rank(), p.dp_replicate * p.dp_shard
        self.pp_rank = self.mesh["pp"].get_local_rank()
        # Global-batch balance sums expert counts over dp in its own group: under the overlapped pipeline it
        # may run beside another micro-batch's expert exchange.
        groups = [self.mesh.mesh[i].flatten().tolist() for i in range(p.pp)]
        self.balance_group, _ = dist.new_subgroups_by_enumeration(groups)

    def build(self, model: nn.Module) -> list[nn.Module]:
        """This rank's part of the (fully initialised, identical on every rank) model: its pipeline stages with
        experts sharded over ep and parameters over dp, on the device."""
        p = self.p
        moe_ids = [int(i) for i, layer in model.layers.items() if isinstance(layer.mlp, MoE)]
        if p.pp > 1:
            all_stages = rank_stages(p.pp, p.pp_schedule)
            n = sum(map(len, all_stages))
            layers = stage_layers(len(model.layers), n)
            mine = all_stages[self.pp_rank]
            chunks = [prune(model, layers[s], s == 0, s == n - 1) for s in mine]
        else:
            chunks = [model]
        for chunk in chunks:
            for layer in chunk.layers.values():
                if isinstance(layer.mlp, MoE):
                    layer.mlp.gate.balance_group = self.balance_group if self.distributed else None
                    if p.ep > 1:
                        self._shard_experts(layer.mlp)
            chunk.to(self.device)
            if self.dp_size > 1:
                self._fully_shard(chunk)
        if p.pp > 1:
            rows = [[moe_ids.index(int(i)) for i in c.layers if int(i) in moe_ids] for c in chunks]
            self.pipeline = Pipeline(
                chunks, mine, all_stages, self.mesh["pp"].get_group(), p.pp_schedule, p.pp_overlap and p.ep > 1,
                model.cfg.hidden_size, rows, self.device, len(moe_ids), model.cfg.router.num_experts)
        return chunks

    def _shard_experts(self, moe: MoE) -> None:
        ep = self.mesh["ep"]
        num_experts = moe.experts.w_gate_up.shape[0]
        n, r = num_experts // ep.size(), ep.get_local_rank()
        for name in ("w_gate_up", "w_down"):
            local = getattr(moe.experts, name).detach()[r * n:(r + 1) * n].to(self.device, copy=True)
            setattr(moe.experts, name, nn.Parameter(DTensor.from_local(local, ep, [Shard(0)], run_check=False)))
        moe.ep = ExpertParallel(ep.get_group(), num_experts)

    def _fully_shard(self, chunk: nn.Module) -> None:
        rep = self.p.dp_replicate > 1
        dense = self.dense_mesh["dp_replicate", "dp_shard"] if rep else self.dense_mesh["dp_shard"]
        experts = self.mesh["dp_replicate", "efsdp"] if rep else self.mesh["efsdp"]
        reshard = self.p.pp == 1  # pipeline: stay gathered across the step's micro-batches
        for layer in chunk.layers.values():
            if self.p.ep > 1 and isinstance(layer.mlp, MoE):
                fully_shard(layer.mlp.experts, mesh=experts, reshard_after_forward=reshard)
                register_fsdp_forward_method(layer.mlp.experts, "run")  # the expert-parallel path calls run()
            fully_shard(layer, mesh=dense, reshard_after_forward=reshard)
        fully_shard(chunk, mesh=dense, reshard_after_forward=reshard)

    def set_gradient_sync(self, chunks, enabled: bool) -> None:
        """Gradient accumulation without a pipeline: FSDP reduces only in the last micro-batch's backward."""
        for chunk in chunks:
            if isinstance(chunk, FSDPModule):
                chunk.set_requires_gradient_sync(enabled)

    def pipeline_step(self, chunks, batches, amp_dtype):
        fsdp = [c for c in chunks if isinstance(c, FSDPModule)]
        for c in fsdp:
            c.set_requires_gradient_sync(False)
            c.set_reshard_after_backward(False)
            c.set_is_last_backward(False)
        stats = self.pipeline.run(batches, amp_dtype)
        for c in fsdp:
            _reduce_gradients(c)
        return stats

    @torch.no_grad()
    def grad_norm(self, params: list) -> torch.Tensor:
        """Global gradient norm over every rank's shards. Squares are summed in float64, so the norm does not
        depend on how the gradients are sharded (fp32 sums over large tensors drift by ~1e-5). Each shard lives
        on dp_replicate ranks, hence the division."""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        if grads:
            square = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum().to(self.device)
        return (self.all_reduce(square) / self.p.dp_replicate).sqrt().float()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _reduce_gradients(module: FSDPModule) -> None:
    """FSDP2's post-backward for every parameter group, run once after the pipeline's last backward (what
    torch.distributed.pipelining does for its REDUCE_GRAD action)."""
    module.set_is_last_backward(True)
    module.set_reshard_after_backward(True)
    module.set_requires_gradient_sync(True)
    state = fully_shard.state(module)
    for s in state._state_ctx.all_states:
        groups = getattr(s, "_fsdp_param_groups", None)  # torch >= 2.12 (a list); 2.11 has one group or None
        for group in groups if groups is not None else [s._fsdp_param_group]:
            if group is not None:
                group.post_backward()
    state._root_post_backward_final_callback()
