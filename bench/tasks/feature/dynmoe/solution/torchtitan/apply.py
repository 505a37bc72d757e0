"""Oracle of feature/dynmoe on TorchTitan: add DynMoE top-any gating to a TorchTitan workspace.

    python apply.py <workspace>

New code (MoEArgs.gating, the router's top-any branch and threshold, the job-config key model.moe_gating, the
`active_experts` metric of ate_run) plus small hooks, each placed by an anchor that must occur exactly once; a
missing anchor stops with a message and leaves every file untouched.
"""

import sys

from source_edit import SourceEdits

MOE_ARGS = """\
    # "top_k": each token takes top_k experts. "top_any" (DynMoE): each token takes every expert whose score
    # passes that expert's trainable threshold (at least one), see TokenChoiceTopKRouter.top_any; top_k,
    # score_func, route_norm, route_scale and the expert bias (load_balance_coeff) are then unused.
    gating: Literal["top_k", "top_any"] = "top_k"

    def __post_init__(self):
        if self.gating not in ("top_k", "top_any"):
            raise ValueError(f"moe_args.gating must be 'top_k' or 'top_any', got {self.gating!r}")
        unsupported = self.num_expert_groups or self.gate_bias or self._debug_force_load_balance
        if self.gating == "top_any" and unsupported:
            raise ValueError(
                "moe_args.gating='top_any' does not support num_expert_groups, gate_bias or force_load_balance"
            )
"""

ROUTER_INIT = """\
        self.gating = gating
        # DynMoE's trainable per-expert threshold g (tau = sigmoid(g)); top-any gating only.
        self.threshold = nn.Parameter(torch.zeros(num_experts)) if gating == "top_any" else None
"""

TOP_ANY = '''\
    def top_any(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DynMoE top-any gating (Guo et al. 2024): a token activates every expert whose score passes that
        expert's trainable threshold, so the number of experts per token varies (at least one).

        s[t, e] = sigmoid(cos(x_t, gate.weight[e])) and tau[e] = sigmoid(threshold[e]); expert e is active for
        token t when s[t, e] > tau[e]. Each of a token's K active experts gets weight 1/K. The step is
        differentiated as relu(s - tau) (straight-through, K held fixed), so gate.weight and threshold train. A
        token with no active expert goes to its best-scoring one with weight 1 (no gradient). Slots: top_k = E
        per token, the chosen experts first, the others with weight 0; the count per expert is of chosen pairs.
        """
        cos = F.normalize(x.float(), dim=-1) @ F.normalize(self.gate.weight.float(), dim=-1).t()
        scores = cos.sigmoid()
        margin = F.relu(scores - self.threshold.float().sigmoid())
        active = margin > 0
        count = active.sum(dim=-1, keepdim=True)
        step = margin + (active.float() - margin).detach()  # value 0 or 1, gradient that of the margin
        best = F.one_hot(scores.argmax(dim=-1), self.num_experts).float()
        weights = torch.where(count > 0, step / count.clamp_min(1), best)  # [T, E] combine weights
        chosen = weights.detach() > 0
        order = (chosen.float() * 2 + scores.detach()).argsort(dim=-1, descending=True)
        return weights.gather(1, order), order, chosen.sum(dim=0).float()

'''


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    moe = edits.file("torchtitan/models/moe/moe.py")
    moe.after_line("    # if True, we force each experts get same amount of token via round-robin", MOE_ARGS)
    moe.replace(
        "        _debug_force_load_balance: bool = False,\n    ):",
        '        _debug_force_load_balance: bool = False,\n        gating: str = "top_k",\n    ):',
    )
    moe.after_line("        self._debug_force_load_balance = _debug_force_load_balance", ROUTER_INIT)
    moe.replace(
        "    def _debug_force_load_balance_routing(", TOP_ANY + "    def _debug_force_load_balance_routing("
    )
    moe.replace(
        "        # scores shape (bs*slen, num_experts)\n        scores = self.gate(x)\n",
        '        if self.gating == "top_any":\n            return self.top_any(x)\n'
        "        # scores shape (bs*slen, num_experts)\n        scores = self.gate(x)\n",
    )
    moe.after_line(
        "        trunc_normal_(self.gate.weight, mean=0.0, std=init_std)",
        "        if self.threshold is not None:\n            nn.init.zeros_(self.threshold)\n",
    )
    # top-any fills every slot (k = E, weight 0 where unused); it does not use the expert bias.
    moe.replace(
        "        num_experts = moe_args.num_experts\n",
        "        num_experts = moe_args.num_experts\n"
        '        top_k = num_experts if moe_args.gating == "top_any" else moe_args.top_k\n',
    )
    moe.replace("            top_k=moe_args.top_k,\n", "            top_k=top_k,\n")
    moe.replace(
        "            _debug_force_load_balance=moe_args._debug_force_load_balance,\n        )",
        "            _debug_force_load_balance=moe_args._debug_force_load_balance,\n"
        "            gating=moe_args.gating,\n        )",
    )
    moe.replace(
        "self.reorderer = TokenReorderer(num_experts=num_experts, top_k=moe_args.top_k)",
        "self.reorderer = TokenReorderer(num_experts=num_experts, top_k=top_k)",
    )
    moe.replace(
        "        self.load_balance_coeff = moe_args.load_balance_coeff\n",
        '        self.load_balance_coeff = moe_args.load_balance_coeff if moe_args.gating == "top_k" else None\n',
    )

    job = edits.file("torchtitan/config/job_config.py")
    doc = '    """\n    If true, model definition will be printed to stdout after all model\n    converters have been applied.\n    """\n'
    job.replace(
        "    print_after_conversion: bool = False\n" + doc,
        "    print_after_conversion: bool = False\n" + doc + '\n    moe_gating: str = "top_k"\n'
        '    """MoE routing: "top_k" or "top_any" (DynMoE top-any gating, per-expert trainable thresholds)."""\n',
    )

    args = edits.file("torchtitan/models/deepseek_v3/model/args.py")
    args.after_line(
        "        self.moe_impl = job_config.parallelism.expert_parallel_comm_backend",
        "\n        gating = job_config.model.moe_gating\n"
        '        if gating not in ("top_k", "top_any"):\n'
        "            raise ValueError(f\"model.moe_gating must be 'top_k' or 'top_any', got {gating!r}\")\n"
        "        self.moe_args.gating = gating\n"
        "        self.moe_args.__post_init__()\n",
    )

    spec = edits.file("ate_run/deepseek_v2_lite.py")
    spec.replace(
        '    def __init__(self, inner, path: Path):\n        self.inner, self.file = inner, open(path, "a")\n',
        "    def __init__(self, inner, path: Path, processor=None, tokens_per_step: int = 0):\n"
        '        self.inner, self.file = inner, open(path, "a")\n'
        "        self.processor, self.tokens_per_step, self.last_step = processor, tokens_per_step, 0\n",
    )
    spec.replace(
        '        row = {"step": step, **{k: float(metrics[v]) for k, v in self.FIELDS.items() if v in metrics}}\n',
        '        row = {"step": step, **{k: float(metrics[v]) for k, v in self.FIELDS.items() if v in metrics}}\n'
        "        row.update(self.active_experts(step))\n",
    )
    spec.replace(
        "    def close(self) -> None:\n        self.file.close()",
        '''    def active_experts(self, step: int) -> dict:
        """DynMoE top-any gating: mean number of experts a token activated since the last logged step, per MoE
        layer, from each MoE's tokens_per_expert (chosen (token, expert) pairs; top-any has no expert bias, whose
        hook would reset it), which is reset here."""
        moes = [m for part in getattr(self.processor, "model_parts", None) or [] for m in part.modules()
                if getattr(getattr(m, "router", None), "gating", None) == "top_any"]
        steps, self.last_step = step - self.last_step, step
        if not moes:
            return {}
        active = [float(m.tokens_per_expert.sum()) / (self.tokens_per_step * steps) for m in moes]
        for m in moes:
            m.tokens_per_expert.zero_()
        return {"active_experts": active}

    def close(self) -> None:
        self.file.close()''',
    )
    spec.replace(
        'processor.logger = JsonlLogger(processor.logger, out / "metrics.jsonl")',
        "t = job_config.training\n"
        "        tokens = (t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size) * t.seq_len\n"
        '        processor.logger = JsonlLogger(processor.logger, out / "metrics.jsonl", processor,\n'
        "                                       tokens // max(1, parallel_dims.dp_shard * parallel_dims.dp_replicate))",
    )
    edits.write()  # only now: every anchor was found
    print("apply.py: DynMoE top-any gating added (--model.moe_gating top_any)")


if __name__ == "__main__":
    main()
