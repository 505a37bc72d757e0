"""Pipeline parallelism: stages, schedules (1F1B and DualPipeV) and the runtime that executes them.

Stages. The decoder layers are split into contiguous stages; the first embeds, the last ends in norm + lm_head.
1F1B puts stage r on pp rank r. DualPipeV puts two stages on each rank in a V: rank r holds stages r and
2*pp-1-r, so rank 0 holds both the embedding and the head. A stage is the model with the other layers and
parts removed (`prune`), so its parameter names are the full model's and checkpoints need no renaming.

Micro-batches are the train.grad_accum micro-batches of a step, so a pipelined step sees exactly the tokens and
micro-batch split of the non-pipelined step with the same config.

Loss and router losses. The last stage's loss is (ce + aux) / M. A stage in the middle has no loss of its own,
so its router losses (aux = lb_coef * balance + z_coef * z-loss of its layers) ride on its output activation:
`_AttachAux` is the identity in forward and hands aux a gradient of 1/M in backward, so the stage's backward
(driven by the gradient of its output) also backpropagates its aux loss, into its own layers and, through its
input gradient, into earlier stages. Gradients therefore equal those of sum_m (ce_m + aux_m) / M unpipelined.

Runtime. Every rank derives the whole schedule of every rank, places each action on a global tick (the earliest
after its inputs were produced and after the rank's previous action), and runs tick by tick: compute, then one
batched exchange (batch_isend_irecv) of exactly the activations and gradients produced in that tick, which the
receivers post in the same tick and in the same order. The exchange therefore always matches and cannot deadlock,
with NCCL as with gloo. DualPipeV pairs the forward of one micro-batch with the backward of another on the other
stage; with parallel.pp_overlap they run in two threads that take turns at the expert all-to-alls (expert.py).
Without zero-bubble weight/input splitting, this DualPipeV has somewhat larger bubbles than DeepSeek's.
"""

import copy
import threading
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from pithtrain.parallel.expert import OVERLAP


def stage_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous layer ranges, as even as possible (earlier stages take the remainder)."""
    sizes = [num_layers // num_stages + (s < num_layers % num_stages) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [list(range(a, a + n)) for a, n in zip(starts, sizes)]


def rank_stages(pp: int, schedule: str) -> list[list[int]]:
    """Stages of each pp rank: one per rank (1f1b) or two in a V (dualpipev)."""
    return [[r, 2 * pp - 1 - r] if schedule == "dualpipev" else [r] for r in range(pp)]


def prune(model: nn.Module, layers: list[int], first: bool, last: bool) -> nn.Module:
    """A stage: a copy of `model`'s embedding/head shell holding only `layers` (shared, not copied)."""
    all_layers, model.layers = model.layers, nn.ModuleDict()
    stage = copy.deepcopy(model)
    model.layers = all_layers
    stage.layers = nn.ModuleDict({str(i): all_layers[str(i)] for i in layers})
    if not first:
        stage.embed_tokens = None
    if not last:
        stage.norm = stage.lm_head = None
    return stage


# ---- schedules: per rank, an ordered list of actions; an action is one or two (kind, stage, micro-batch) ----


def schedule_1f1b(pp: int, m: int) -> list[list[tuple]]:
    orders = []
    for r in range(pp):
        warm = min(pp - r - 1, m)
        order = [(("F", r, i),) for i in range(warm)]
        for i in range(m - warm):
            order += [(("F", r, warm + i),), (("B", r, i),)]
        orders.append(order + [(("B", r, i),) for i in range(m - warm, m)])
    return orders


def schedule_dualpipev(pp: int, m: int) -> list[list[tuple]]:
    """DualPipeV (DeepSeek's DualPipe cut in half, as in torch.distributed.pipelining.ScheduleDualPipeV) with
    full backwards in place of its input/weight split; pairs of actions are the overlapped F&B steps."""
    return [_dualpipev_rank(pp, m, r) for r in range(pp)]


def _dualpipev_rank(pp: int, m: int, r: int) -> list[tuple]:
    s0, s1, order, count = r, 2 * pp - 1 - r, [], {}

    def op(kind, stage):
        i = count.get((kind, stage), 0)
        count[(kind, stage)] = i + 1
        return (kind, stage, i)

    def add(*parts):  # one action: a single (kind, stage) or an overlapped (F, stage), (B, stage) pair
        order.append(tuple(op(kind, stage) for kind, stage in parts))

    for _ in range((pp - r - 1) * 2):
        add(("F", s0))
    for _ in range(r + 1):
        add(("F", s0))
        add(("F", s1))
    for _ in range(pp - r - 1):
        add(("B", s1))
        add(("F", s1))
    for i in range(m - 2 * pp + r + 1):
        if i == 0 and r == pp - 1:  # as DeepSeek: not overlapped, to shorten the bubble
            add(("F", s0))
            add(("B", s1))
        else:
            add(("F", s0), ("B", s1))
        add(("F", s1), ("B", s0))
    for _ in range(pp - r - 1):
        add(("B", s1))
        add(("F", s1), ("B", s0))
    for _ in range(r + 1):
        add(("B", s1))
        add(("B", s0))
    for _ in range(pp - r - 1):
        add(("B", s0))
    return order


def schedule_forward(stages: list[list[int]], m: int) -> list[list[tuple]]:
    """Forward only (evaluation): each rank runs its stages in order for every micro-batch."""
    return [[(("F", s, i),) for i in range(m) for s in sorted(mine)] for mine in stages]


def place_on_ticks(orders: list[list[tuple]], rank_of: dict[int, int], num_stages: int) -> list[dict[int, tuple]]:
    """Give each action the earliest tick after its rank's previous action and after the actions producing its
    inputs (an activation or gradient made in tick t can be used from tick t + 1)."""
    tick: dict[tuple, int] = {}
    plans: list[dict[int, tuple]] = [{} for _ in orders]
    nxt, last = [0] * len(orders), [-1] * len(orders)

    def deps(kind, s, i):
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        return [("F", s, i)] + ([("B", s + 1, i)] if s < num_stages - 1 else [])

    while any(nxt[r] < len(o) for r, o in enumerate(orders)):
        progress = False
        for r, order in enumerate(orders):
            while nxt[r] < len(order):
                action = order[nxt[r]]
                needed = [d for part in action for d in deps(*part)]
                if any(d not in tick for d in needed):
                    break
                t = max([last[r] + 1] + [tick[d] + 1 for d in needed])
                for part in action:
                    tick[part] = t
                plans[r][t], last[r], nxt[r], progress = action, t, nxt[r] + 1, True
        if not progress:
            raise RuntimeError("pipeline schedule has a cycle; this is a bug in the schedule")
    return plans


class _AttachAux(torch.autograd.Function):
    """Identity on the activation; in backward, gives the stage's aux loss the gradient `scale`."""

    @staticmethod
    def forward(ctx, h, aux, scale):
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, device=grad.device), None


class Pipeline:
    """Runs one step of a schedule over this rank's stage modules (`chunks`, in the order of `stages`)."""

    def __init__(self, chunks, stages, all_stages, group, schedule: str, overlap: bool, hidden_size: int,
                 moe_rows, device, num_layers_moe: int, num_experts: int):
        self.chunks, self.stages, self.group, self.device = chunks, stages, group, device
        self.schedule, self.overlap, self.hidden = schedule, overlap, hidden_size
        self.rank, self.pp = dist.get_rank(group), dist.get_world_size(group)
        self.num_stages = sum(len(s) for s in all_stages)
        self.rank_of = {s: r for r, mine in enumerate(all_stages) for s in mine}
        self.all_stages = all_stages
        self.module = dict(zip(stages, chunks))
        self.rows = dict(zip(stages, moe_rows))  # stage -> global MoE-layer rows of its layers
        self.load_shape = (num_layers_moe, num_experts)
        self._plans = {}
        dist.barrier(group=group)  # NCCL: create the communicator with every rank before batched p2p

    def _plan(self, m: int, train: bool):
        key = (m, train)
        if key not in self._plans:
            if not train:
                orders = schedule_forward(self.all_stages, m)
            elif self.schedule == "dualpipev":
                orders = schedule_dualpipev(self.pp, m)
            else:
                orders = schedule_1f1b(self.pp, m)
            plans = place_on_ticks(orders, self.rank_of, self.num_stages)
            transfers: dict[int, list] = {}
            for r, plan in enumerate(plans):
                for t, action in plan.items():
                    for kind, s, i in action:
                        dst = s + 1 if kind == "F" else s - 1
                        if 0 <= dst < self.num_stages and self.rank_of[dst] != r and (train or kind == "F"):
                            transfers.setdefault(t, []).append(((kind, dst, i), r, self.rank_of[dst]))
            self._plans[key] = (plans[self.rank], {t: sorted(v) for t, v in transfers.items()},
                                max(max(p, default=-1) for p in plans) + 1)
        return self._plans[key]

    def run(self, batches, amp_dtype=None, train: bool = True):
        """Forward (and backward) of all micro-batches. Returns local sums (ce over last-stage micro-batches,
        lb, z, expert load [moe layers, E]); gradients are left in the parameters, scaled by 1/M."""
        m = len(batches)
        plan, transfers, ticks = self._plan(m, train)
        self.buf, self.saved, self.m, self.amp, self.train = {}, {}, m, amp_dtype, train
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in batches]
        zero = torch.zeros((), device=self.device)
        self.ce, self.lb, self.z = zero, zero, zero
        self.load = torch.zeros(self.load_shape, dtype=torch.long, device=self.device)
        self.pending = {}
        for t in range(ticks):
            action = plan.get(t)
            if action is not None and len(action) == 2 and self.overlap:
                self._overlapped(*action)
            elif action is not None:
                for part in action:
                    self._forward(*part[1:]) if part[0] == "F" else self._backward(*part[1:])
            ops = []
            for (kind, dst, i), src, dst_rank in transfers.get(t, []):
                if src == self.rank:
                    ops.append(dist.P2POp(dist.isend, self.pending.pop((kind, dst, i)),
                                          dist.get_global_rank(self.group, dst_rank), self.group))
                elif dst_rank == self.rank:
                    x = self.batches[i][0]
                    buf = torch.empty(*x.shape, self.hidden, device=self.device)
                    self.buf[(kind, dst, i)] = buf
                    ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(self.group, src), self.group))
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
        return self.ce, self.lb, self.z, self.load

    def _deliver(self, key, tensor):
        if self.rank_of[key[1]] == self.rank:
            self.buf[key] = tensor
        else:
            self.pending[key] = tensor

    def _forward(self, s: int, i: int):
        x, y = self.batches[i]
        last = s == self.num_stages - 1
        if s > 0:
            x = self.buf.pop(("F", s, i)).detach().requires_grad_(self.train)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            out = self.module[s](x, labels=y if last else None, return_logits=False)
        self.lb, self.z = self.lb + out.lb_loss, self.z + out.z_loss
        self.load[self.rows[s]] += out.expert_load
        if last:
            self.ce = self.ce + out.loss.detach()
            self.saved[(s, i)] = (x, (out.loss + out.aux_loss) / self.m)
            return
        h = out.hidden.float()
        if self.train and out.aux_loss.requires_grad:
            h = _AttachAux.apply(h, out.aux_loss, 1.0 / self.m)
        if self.train:
            self.saved[(s, i)] = (x, h)
        self._deliver(("F", s + 1, i), h.detach())

    def _backward(self, s: int, i: int):
        x, out = self.saved.pop((s, i))
        if s == self.num_stages - 1:
            out.backward()
        else:
            torch.autograd.backward(out, self.buf.pop(("B", s, i)))
        if s > 0:
            self._deliver(("B", s - 1, i), x.grad)

    def _overlapped(self, fwd, bwd):
        """F of one micro-batch in this thread and B of another in a second thread, taking turns (expert.py)."""
        errors = []

        def backward():
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                self._backward(*bwd[1:])
            except BaseException as e:  # re-raised below
                errors.append(e)
            finally:
                OVERLAP.stop()

        OVERLAP.start()
        OVERLAP.local.forward = True
        thread = threading.Thread(target=backward, daemon=True)
        thread.start()
        try:
            self._forward(*fwd[1:])
        finally:
            OVERLAP.local.forward = False
            OVERLAP.stop()
            thread.join()
        if errors:
            raise errors[0]
