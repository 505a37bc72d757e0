"""Building blocks shared by the model files: RMSNorm, the dense SwiGLU MLP, the router and the MoE layer.

Each model file (deepseek_v2.py, qwen3_moe.py) builds its decoder from these with direct calls.
Everything here is pure-functional in its outputs: routing statistics (load per expert, balance
losses) are returned, never stashed on modules, so activation checkpointing and pipeline stages
can recompute a layer without double counting.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from pithtrain.ops.cross_entropy import linear_cross_entropy
from pithtrain.ops.grouped_mm import grouped_mm
from pithtrain.ops.permute import permute, unpermute
from pithtrain.ops.rmsnorm import rms_norm
from pithtrain.ops.router import balanced_assignment, router_topk
from pithtrain.ops.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x / rms(x)) computed in fp32 and rounded to x's dtype before the weight (as transformers)."""
        return rms_norm(x, self.weight, self.eps)


class SwiGLUMLP(nn.Module):
    """Dense MLP: down(silu(gate(x)) * up(x)); names follow the Hugging Face checkpoints."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterConfig:
    """How tokens pick experts, and how balance is encouraged. The `[model.router]` config table."""

    num_experts: int = 8
    top_k: int = 2
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the selected weights (DeepSeek)
    n_group: int = 1  # group-limited selection: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen
    expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias added for selection only
    bias_update_rate: float = 1e-3  # bias += rate * sign(mean_load - load) after each optimizer step
    lb_loss_coef: float = 0.0  # load-balancing loss weight
    lb_loss_level: str = "micro_batch"  # "micro_batch" | "sequence" | "global_batch"
    z_loss_coef: float = 0.0  # router z-loss weight: mean(logsumexp(logits)^2)
    # Throughput benchmarking only: every expert gets the same number of token slots (the router still scores
    # and its gate weights still train), as production benchmarks do to take routing skew out of the numbers.
    force_balanced: bool = False

    def validate(self, prefix: str = "model.router") -> None:
        """Raise ValueError naming the offending key."""
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"{prefix}.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.lb_loss_level not in ("micro_batch", "sequence", "global_batch"):
            raise ValueError(
                f"{prefix}.lb_loss_level must be micro_batch, sequence or global_batch, got {self.lb_loss_level!r}"
            )
        if self.num_experts < 1:
            raise ValueError(f"{prefix}.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{prefix}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"{prefix}.n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"{prefix}.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"{prefix}.top_k={self.top_k} exceeds the experts reachable in topk_group={self.topk_group} groups"
            )


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots routed to each expert [E] int64; a scatter-add, so its shape is static (bincount's depends on the
    data, which breaks torch.compile graphs) and nothing waits on the host."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class RouterOutput(NamedTuple):
    expert_ids: torch.Tensor  # [T, k] int64
    gate_weights: torch.Tensor  # [T, k] float32
    lb_loss: torch.Tensor  # scalar, unweighted
    z_loss: torch.Tensor  # scalar, unweighted
    load: torch.Tensor  # [E] int64, tokens routed to each expert in this call


class Router(nn.Module):
    def __init__(self, hidden_size: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        # Persistent so that checkpoints carry it; zeros and unused unless cfg.expert_bias.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=cfg.expert_bias)
        self.balance_group = None  # process group over which global-batch load is summed (None: world)

    def forward(self, x: torch.Tensor, batch_size: int = 1) -> RouterOutput:
        """x [T, H] (T = batch_size * seq) -> routing decision and statistics."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        bias = self.expert_bias if cfg.expert_bias else None
        if cfg.n_group == 1 and not cfg.force_balanced:  # one fused kernel on GPU (ops/router.py)
            expert_ids, weights, scores = router_topk(
                logits, cfg.top_k, cfg.score_func, bias, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        else:
            scores = logits.softmax(dim=-1) if cfg.score_func == "softmax" else logits.sigmoid()
            select = scores + bias if bias is not None else scores
            if cfg.force_balanced:
                expert_ids = balanced_assignment(x.shape[0], cfg.top_k, cfg.num_experts, x.device)
            else:  # group-limited: only the best topk_group groups (by their best expert) may be chosen
                grouped = select.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
                best_groups = grouped.amax(dim=-1).topk(cfg.topk_group, dim=-1).indices
                keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
                select = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, cfg.num_experts)
                expert_ids = select.topk(cfg.top_k, dim=-1).indices
            weights = scores.gather(1, expert_ids)
            if cfg.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            weights = weights * cfg.routed_scaling_factor

        load = expert_counts(expert_ids, cfg.num_experts)
        zero = logits.new_zeros(())
        lb_loss = self.balance_loss(scores, expert_ids, load, batch_size) if cfg.lb_loss_coef else zero
        z_loss = torch.logsumexp(logits, dim=-1).square().mean() if cfg.z_loss_coef else zero
        return RouterOutput(expert_ids, weights, lb_loss, z_loss, load)

    def balance_loss(self, scores, expert_ids, load, batch_size: int) -> torch.Tensor:
        """Switch-style loss E * sum_i f_i * P_i (f: share of routed slots, P: mean probability).

        micro_batch: f and P over this micro-batch; sequence: per sequence, then averaged;
        global_batch: f summed over the data-parallel group (P stays local), as in Qwen's
        global-batch balancing, so the loss does not push every micro-batch to be balanced.
        """
        cfg = self.cfg
        probs = scores / scores.sum(dim=-1, keepdim=True)
        if cfg.lb_loss_level == "sequence":
            seq_probs = probs.view(batch_size, -1, cfg.num_experts)
            ids = expert_ids.view(batch_size, -1)
            counts = torch.zeros(batch_size, cfg.num_experts, device=probs.device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
            f = counts / ids.shape[1]
            return cfg.num_experts * (f * seq_probs.mean(dim=1)).sum(dim=-1).mean()
        counts = load.float()
        if cfg.lb_loss_level == "global_batch" and dist.is_available() and dist.is_initialized():
            counts = counts.clone()
            dist.all_reduce(counts, group=self.balance_group)
        f = counts / counts.sum()
        return cfg.num_experts * (f * probs.mean(dim=0)).sum()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): raise under-loaded experts, lower over-loaded."""
        if self.cfg.expert_bias:
            load = load.float()
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


class GroupedExperts(nn.Module):
    """All routed experts as grouped weights [E, in, out]; gate and up projections fused."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
        with record_function("pithtrain.dispatch"):
            x_sorted, order, counts = permute(x, expert_ids, self.w_gate_up.shape[0])
        with record_function("pithtrain.experts"):
            y_sorted = self.run(x_sorted, counts)
        with record_function("pithtrain.combine"):
            return unpermute(y_sorted, order, gate_weights)

    def run(self, x_sorted: torch.Tensor, counts: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        """Rows sorted by expert, counts [experts held here] -> expert outputs in the same order. Under expert
        parallelism the weights are DTensors sharded over the ep ranks (this rank computes its local slice), and
        grad_scale < 1 turns the sum of every ep rank's loss gradient into their mean (see parallel/expert.py)."""
        w1, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w_gate_up, self.w_down))
        if grad_scale != 1.0:
            w1, w2 = _ScaleGrad.apply(w1, grad_scale), _ScaleGrad.apply(w2, grad_scale)
        offsets = counts.cumsum(0).to(torch.int32)
        return grouped_mm(swiglu(grouped_mm(x_sorted, w1, offsets)), w2, offsets)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class MoE(nn.Module):
    """Router + routed experts (+ optional always-on shared experts, DeepSeek style)."""

    def __init__(self, hidden_size: int, expert_intermediate_size: int, router: RouterConfig, num_shared_experts: int = 0):
        super().__init__()
        self.gate = Router(hidden_size, router)
        self.experts = GroupedExperts(router.num_experts, hidden_size, expert_intermediate_size)
        self.shared_experts = (
            SwiGLUMLP(hidden_size, expert_intermediate_size * num_shared_experts) if num_shared_experts else None
        )
        self.ep = None  # parallel.expert.ExpertParallel when the experts are sharded over several ranks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        with record_function("pithtrain.router"):
            route = self.gate(flat, batch_size=batch)
        if self.ep is None:
            y = self.experts(flat, route.expert_ids, route.gate_weights)
        else:
            y = self.ep(flat, route.expert_ids, route.gate_weights, self.experts)
        if self.shared_experts is not None:
            with record_function("pithtrain.experts"):
                y = y + self.shared_experts(flat)
        return y.view(batch, seq, hidden), route


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, S, V], None when only the loss was asked for
    loss: torch.Tensor | None  # mean next-token cross-entropy over labels != -100
    aux_loss: torch.Tensor  # sum over MoE layers of lb_coef * lb_loss + z_coef * z_loss (has grads)
    lb_loss: torch.Tensor  # sum over MoE layers of the unweighted balance loss (for logging)
    z_loss: torch.Tensor  # likewise for the z-loss
    expert_load: torch.Tensor  # [num_moe_layers, E] int64, tokens per expert in this forward
    hidden: torch.Tensor | None = None  # a pipeline stage without lm_head: its output hidden state


def decoder_forward(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, return_logits: bool):
    """embed_tokens -> decoder layers -> norm + lm_head, shared by the model files. A pipeline stage is the same
    model with parts removed (parallel/pipeline.py): without embed_tokens `x` is the incoming hidden state, without
    lm_head the outgoing one is returned in `hidden`. `model.layers` is a ModuleDict keyed by the global layer
    index, so a stage's parameter names are the full model's."""
    h = x if model.embed_tokens is None else model.embed_tokens(x)
    cos, sin = model.rope(h.shape[1], h.device, h.dtype)
    routes = []
    for layer in model.layers.values():
        if model.activation_checkpointing and torch.is_grad_enabled():
            h, route = checkpoint(layer, h, cos, sin, use_reentrant=False)
        else:
            h, route = layer(h, cos, sin)
        if route is not None:
            routes.append(route)
    aux, lb, z, load = collect_router_stats(routes, model.cfg.router, h.device)
    if model.lm_head is None:
        return CausalLMOutput(None, None, aux, lb, z, load, hidden=h)
    with record_function("pithtrain.loss"):
        if labels is not None and not return_logits:  # chunked: the [tokens, vocab] logits never exist at once
            logits, loss = None, linear_cross_entropy(model.norm(h), model.lm_head.weight, labels)
        else:
            logits = model.lm_head(model.norm(h))
            loss = causal_lm_loss(logits, labels) if labels is not None else None
    return CausalLMOutput(logits if return_logits else None, loss, aux, lb, z, load)


def collect_router_stats(routes: list[RouterOutput], cfg: RouterConfig, device) -> tuple:
    """Sum the per-layer router outputs into (aux_loss, lb_loss, z_loss, expert_load)."""
    if not routes:
        zero = torch.zeros((), device=device)
        return zero, zero, zero, torch.zeros(0, cfg.num_experts, dtype=torch.long, device=device)
    lb = torch.stack([r.lb_loss for r in routes]).sum()
    z = torch.stack([r.z_loss for r in routes]).sum()
    aux = cfg.lb_loss_coef * lb + cfg.z_loss_coef * z
    return aux, lb.detach(), z.detach(), torch.stack([r.load for r in routes])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, S, V] against labels [B, S] (already shifted; -100 ignored)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for every matrix and expert bank, ones for norms, zero router biases; deterministic
    under a seed. Buffers are reset too: after `to_empty()` from the meta device they hold garbage."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            nn.init.ones_(p) if "norm" in name else nn.init.zeros_(p)
        else:
            nn.init.normal_(p, mean=0.0, std=std)
    for module in model.modules():
        if isinstance(module, Router):
            module.expert_bias.zero_()


# ---- Hugging Face layout of expert weights (shared by the model files' converters) ----


def experts_to_hf(prefix: str, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grouped [E, H, 2I] / [E, I, H] -> per-expert `{prefix}.{e}.{gate,up,down}_proj.weight` (released layout)."""
    inter = w_down.shape[1]
    out = {}
    for e in range(w_gate_up.shape[0]):
        out[f"{prefix}.{e}.gate_proj.weight"] = w_gate_up[e, :, :inter].t().contiguous()
        out[f"{prefix}.{e}.up_proj.weight"] = w_gate_up[e, :, inter:].t().contiguous()
        out[f"{prefix}.{e}.down_proj.weight"] = w_down[e].t().contiguous()
    return out


def experts_from_hf(sd: dict[str, torch.Tensor], prefix: str, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read experts in either HF layout (per-expert, or transformers-5 fused `gate_up_proj`/`down_proj`);
    pops the keys it used from `sd` and returns (w_gate_up [E, H, 2I], w_down [E, I, H])."""
    if f"{prefix}.gate_up_proj" in sd:
        gate_up = sd.pop(f"{prefix}.gate_up_proj")  # [E, 2I, H]
        down = sd.pop(f"{prefix}.down_proj")  # [E, H, I]
        return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    gate_up, down = [], []
    for e in range(num_experts):
        keys = [f"{prefix}.{e}.{name}_proj.weight" for name in ("gate", "up", "down")]
        missing = [k for k in keys if k not in sd]
        if missing:
            raise KeyError(f"missing expert weight {missing[0]!r} in the Hugging Face checkpoint")
        gate, up, dn = (sd.pop(k) for k in keys)
        gate_up.append(torch.cat([gate.t(), up.t()], dim=1))
        down.append(dn.t())
    return torch.stack(gate_up), torch.stack(down)
