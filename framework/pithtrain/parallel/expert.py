"""Expert parallelism: send each token to the ranks that hold its experts, run them there, and send results back.

Dispatch: a token routed to k experts goes once to every ep rank that holds at least one of them (duplicates to
the same rank are merged), carrying the local ids and gate weights of its experts there. The per-rank counts are
exchanged first, then the tokens with one variable-size all-to-all. The receiving rank sorts (token, expert) pairs
by expert, runs its experts with the grouped GEMM, and sums each token's expert outputs times its gate weights,
so combine returns one row per (token, rank). Any rank or expert may receive nothing.

Gradients flow through both all-to-alls (each backward is the reverse exchange). Expert weight gradients on a rank
sum the losses of all ep ranks whose tokens it served; data parallelism averages over dp_shard/ep of them
(FSDP over the remaining "efsdp" ranks), so the weights' gradients are scaled by 1/ep to make the mean over dp.

Overlap (pipeline dualpipev): `OVERLAP` lets the forward of one micro-batch and the backward of another run in two
threads that take turns at four points around each exchange (before/after dispatch, before/after combine): while
one thread communicates, the other computes, as in DeepSeek's DualPipe and TorchTitan's DualPipeV.
"""

import threading

import torch
import torch.distributed as dist
from torch.profiler import record_function


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of several tensors with the same row splits; backward is the reverse exchange.
    One node for all tensors, so their backward exchange happens at one point of the backward pass."""

    @staticmethod
    def forward(ctx, group, in_splits, out_splits, *tensors):
        ctx.group, ctx.in_splits, ctx.out_splits = group, in_splits, out_splits
        return tuple(_exchange(t, out_splits, in_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):  # grads are materialised (zeros, never None): every rank exchanges every tensor
        return (None, None, None, *(_exchange(g, ctx.in_splits, ctx.out_splits, ctx.group) for g in grads))


class _Overlap:
    """Two threads (a micro-batch's forward, another's backward) taking turns at the exchange points."""

    def __init__(self):
        self.active, self.local = False, threading.local()
        self.barrier, self.turns = threading.Barrier(2), 0  # turns: completed meetings (tests check overlap)

    def start(self):
        self.barrier, self.active, self.skipped = threading.Barrier(2), True, False

    def stop(self):
        self.active = False
        self.barrier.abort()  # the thread still running goes on alone

    def wait(self):
        try:
            if self.barrier.wait() == 0:
                self.turns += 1
        except threading.BrokenBarrierError:
            pass


OVERLAP = _Overlap()


class _SyncPoint(torch.autograd.Function):
    """Identity where, during an overlapped step, the forward thread (in forward) and the backward pass (in
    backward) wait for each other. The backward skips its first point ("after combine" of its last layer), so
    that every turn pairs one thread's exchange with the other's compute; the exchanges of the two threads never
    run at the same time, so every rank issues them in the same order."""

    @staticmethod
    def forward(ctx, x, last: bool):
        ctx.last = last
        if OVERLAP.active and getattr(OVERLAP.local, "forward", False):
            OVERLAP.wait()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if OVERLAP.active:
            if ctx.last and not OVERLAP.skipped:
                OVERLAP.skipped = True
            else:
                OVERLAP.wait()
        return grad, None


def sync_point(x: torch.Tensor, last: bool = False) -> torch.Tensor:
    return _SyncPoint.apply(x, last) if torch.is_grad_enabled() else x


class ExpertParallel:
    """Dispatch / compute / combine for one MoE layer whose experts are split evenly over the ranks of `group`."""

    def __init__(self, group, num_experts: int):
        self.group, self.size = group, dist.get_world_size(group)
        self.local = num_experts // self.size

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor, experts):
        """x [T, H], expert_ids / gate_weights [T, k] -> [T, H] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])."""
        with record_function("pithtrain.dispatch"):
            x_recv, meta_recv, token, send, recv = self.dispatch(x, expert_ids, gate_weights)
        top_k = expert_ids.shape[1]
        with record_function("pithtrain.experts"):
            ids, weights = meta_recv[:, :top_k].long(), meta_recv[:, top_k:]
            row, slot = (ids >= 0).nonzero(as_tuple=True)  # (received row, slot) pairs for local experts
            local_ids = ids[row, slot]
            order = torch.argsort(local_ids, stable=True)
            row, slot = row[order], slot[order]
            counts = torch.bincount(local_ids, minlength=self.local)
            y = experts.run(x_recv[row], counts, grad_scale=1.0 / self.size)
        with record_function("pithtrain.combine"):
            y = y * weights[row, slot].to(y.dtype).unsqueeze(1)
            y_rows = y.new_zeros(x_recv.shape[0], y.shape[1]).index_add_(0, row, y)
            y_rows = sync_point(y_rows)
            (y_back,) = _AllToAll.apply(self.group, recv, send, y_rows)
            y_back = sync_point(y_back, last=True)
            return y_back.new_zeros(expert_ids.shape[0], y_back.shape[1]).index_add_(0, token, y_back)

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor):
        """Send each token once to every rank holding one of its experts, with its local expert ids and gate
        weights. The split sizes must be known on the host (all_to_all_single takes lists): the one sync here."""
        tokens, top_k = expert_ids.shape
        if torch.is_autocast_enabled(x.device.type):  # send what the expert GEMMs would cast to anyway
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = sync_point(x)  # every exchange of this layer's dispatch lies between this point and the next
        dest = expert_ids // self.local  # [T, k] rank of each chosen expert
        hit = torch.zeros(tokens, self.size, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        rank, token = hit.t().nonzero(as_tuple=True)  # one row per (rank, token): sorted by rank, then token
        here = dest[token] == rank[:, None]  # [N, k] which of the token's experts live on that rank
        meta = torch.cat([torch.where(here, expert_ids[token] - rank[:, None] * self.local, -1).float(),
                          torch.where(here, gate_weights[token], 0.0).float()], dim=1)
        send = hit.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # counts first, so buffers can be sized
        send, recv = send.tolist(), recv.tolist()
        x_recv, meta_recv = _AllToAll.apply(self.group, send, recv, x[token], meta)
        return sync_point(x_recv), meta_recv, token, send, recv
