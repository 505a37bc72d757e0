"""Oracle of feature/dynmoe on Megatron-Core: add DynMoE top-any gating to a Megatron-Core workspace.

    python apply.py <workspace>

New code (TransformerConfig.moe_router_gating and its checks, TopKRouter's top-any branch and threshold, the
`active_experts` metric of ate_run/pretrain_gpt.py) plus small hooks, each placed by an anchor that must occur
exactly once; a missing anchor stops with a message and leaves every file untouched.
"""

import sys

from source_edit import SourceEdits

CONFIG_FIELD = '''
    moe_router_gating: str = "top_k"
    """"top_k": each token takes moe_router_topk experts. "top_any" (DynMoE): each token takes every expert whose
    score passes that expert's trainable threshold (at least one), see TopKRouter.top_any; moe_router_topk,
    moe_router_score_function, moe_router_pre_softmax and moe_router_topk_scaling_factor are then unused."""
'''

CONFIG_CHECKS = """\
        if self.moe_router_gating not in ("top_k", "top_any"):
            raise ValueError(f"moe_router_gating must be 'top_k' or 'top_any', got {self.moe_router_gating!r}")
        if self.moe_router_gating == "top_any" and (
            self.moe_router_enable_expert_bias or self.moe_router_num_groups or self.moe_router_force_load_balancing
            or self.moe_expert_capacity_factor is not None
            or self.moe_router_load_balancing_type not in ("aux_loss", "none")
        ):
            raise ValueError("moe_router_gating='top_any' does not support moe_router_enable_expert_bias, "
                             "moe_router_num_groups, moe_router_force_load_balancing, moe_expert_capacity_factor "
                             "or a moe_router_load_balancing_type other than aux_loss and none")
"""

TOP_ANY = '''\
    def top_any(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DynMoE top-any gating (Guo et al. 2024): a token activates every expert whose score passes that
        expert's trainable threshold, so the number of experts per token varies (at least one).

        s[t, e] = sigmoid(cos(x_t, weight[e])) and tau[e] = sigmoid(threshold[e]); expert e is active for token t
        when s[t, e] > tau[e]. Each of a token's K active experts gets weight 1/K. The step is differentiated as
        relu(s - tau) (straight-through, K held fixed), so weight and threshold train. A token with no active
        expert goes to its best-scoring one with weight 1 (no gradient). -> (probs [T, E] combine weights,
        routing_map [T, E] bool: the nonzero ones). The aux loss (aux_loss type) is Switch's on the active map
        and the scores normalised per token; the z-loss is on the cosines.
        """
        x = input.reshape(-1, input.shape[-1]).float()
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        cos = self.apply_z_loss(cos)
        scores = cos.sigmoid()
        margin = F.relu(scores - self.threshold.float().sigmoid())
        active = margin > 0
        count = active.sum(dim=-1, keepdim=True)
        step = margin + (active.float() - margin).detach()  # value 0 or 1, gradient that of the margin
        best = F.one_hot(scores.argmax(dim=-1), self.num_experts).float()
        probs = torch.where(count > 0, step / count.clamp_min(1), best)
        routing_map = probs.detach() > 0
        coeff = self.get_aux_loss_coeff("aux_loss")
        if self.training and torch.is_grad_enabled() and coeff > 0:
            share = scores / scores.sum(dim=-1, keepdim=True)
            aux = coeff * self.num_experts * (routing_map.float().mean(0) * share.mean(0)).sum()
            probs = self.attach_and_log_load_balancing_loss(probs, coeff, aux, "load_balancing_loss",
                                                            self.tp_cp_group)
        return probs, routing_map

'''

METRIC = '''\
class ActiveExperts:
    """DynMoE top-any gating: mean number of experts with a nonzero weight per token, per MoE layer, over the
    forwards since the last pop (forward hooks on the routers, in layer order)."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router import TopKRouter

        self.pairs = {}
        for m in model.modules():
            if isinstance(m, TopKRouter):
                self.pairs[m] = 0
                m.register_forward_hook(self.record)

    def record(self, module, args, out):
        if torch.is_grad_enabled():  # training forwards only
            self.pairs[module] += int((out[0].detach() > 0).sum())

    def pop(self, tokens: int) -> dict:
        counts = list(self.pairs.values())
        self.pairs = dict.fromkeys(self.pairs, 0)
        return {"active_experts": [c / tokens for c in counts]}


'''


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    config = edits.file("megatron/core/transformer/transformer_config.py")
    config.after_line('    """Number of experts to route to for each token."""', CONFIG_FIELD)
    config.replace(
        "        super().__post_init__()\n        if self.fp16 and self.bf16:",
        "        super().__post_init__()\n" + CONFIG_CHECKS + "        if self.fp16 and self.bf16:",
    )

    router = edits.file("megatron/core/transformer/moe/router.py")
    router.replace("import torch\n", "import torch\nimport torch.nn.functional as F\n")
    router.after_line(
        "        self.input_jitter = None",
        "        # DynMoE's trainable per-expert threshold g (tau = sigmoid(g)); top-any gating only.\n"
        "        self.threshold = None\n"
        '        if self.config.moe_router_gating == "top_any":\n'
        "            self.threshold = torch.nn.Parameter(torch.zeros(self.config.num_moe_experts))\n",
    )
    router.replace("    def sinkhorn_load_balancing(", TOP_ANY + "    def sinkhorn_load_balancing(")
    router.after_line(
        "        input = self.apply_input_jitter(input)",
        '        if self.config.moe_router_gating == "top_any":\n            return self.top_any(input)\n',
    )

    entry = edits.file("ate_run/pretrain_gpt.py")
    entry.replace("# ---- checkpoints ----\n", METRIC + "# ---- checkpoints ----\n")
    entry.after_line(
        "            model, optimizer, scheduler = wrap_for_training(model, cfg, device)",
        '            top_any = cfg["model"].get("moe_router_gating") == "top_any"\n'
        "            active = ActiveExperts(model) if top_any else None\n",
    )
    entry.replace(
        '                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}\n',
        '                           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}\n'
        "                    if active is not None:\n"
        "                        rec.update(active.pop(tokens_per_step))\n",
    )
    edits.write()  # only now: every anchor was found
    print('apply.py: DynMoE top-any gating added ([model] moe_router_gating = "top_any")')


if __name__ == "__main__":
    main()
