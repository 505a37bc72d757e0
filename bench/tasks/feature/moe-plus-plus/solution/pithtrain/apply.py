"""Oracle of feature/moe-plus-plus: add MoE++ (zero, copy and constant experts, gating residuals) to a
PithTrain workspace.

    python apply.py <workspace>

New code (RouterConfig keys, ConstantExperts, two MoE methods) plus small hooks, each placed by an anchor that
must occur exactly once; a missing anchor stops with a message and leaves every file untouched.
"""

import sys

from source_edit import SourceEdits

CONFIG_FIELDS = '''\
    # MoE++ (Jin et al. 2024): zero-computation experts routed beside the num_experts FFN experts. The router
    # chooses among num_routes = num_experts + zero + copy + constant experts, in that index order.
    num_zero_experts: int = 0  # output 0
    num_copy_experts: int = 0  # output = input
    num_constant_experts: int = 0  # output = a0 * x + a1 * v, (a0, a1) = softmax(A x): ConstantExperts
    gating_residual: bool = False  # logits += residual_weight @ (the previous MoE layer's logits)

    @property
    def num_routes(self) -> int:
        return self.num_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts

    def routing(self) -> "RouterConfig":
        """The router's view: each of the num_routes choices is one of its experts."""
        if self.num_routes == self.num_experts:
            return self
        return replace(self, num_experts=self.num_routes, num_zero_experts=0, num_copy_experts=0,
                       num_constant_experts=0)

'''

CONFIG_CHECKS = """\
        for key in ("num_zero_experts", "num_copy_experts", "num_constant_experts"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_routes > self.num_experts and self.n_group > 1:
            raise ValueError(f"{prefix}.n_group > 1 is not supported with zero, copy or constant experts")
"""

CONSTANT_EXPERTS = '''\
class ConstantExperts(nn.Module):
    """MoE++ constant experts: expert c maps x to a0 * x + a1 * value[c], (a0, a1) = softmax(w_mix[c] @ x)."""

    def __init__(self, num: int, hidden_size: int):
        super().__init__()
        self.w_mix = nn.Parameter(torch.empty(num, 2, hidden_size))
        self.value = nn.Parameter(torch.empty(num, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> every constant expert's output [T, num, H]."""
        mix = torch.einsum("th,cjh->tcj", x, self.w_mix.to(x.dtype)).softmax(dim=-1)
        return mix[..., :1] * x[:, None, :] + mix[..., 1:] * self.value.to(x.dtype)


'''

MOE_METHODS = '''\
    def ffn_routes(self, route: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and gate weights for the FFN experts. Slots on MoE++'s zero, copy or constant experts go
        to FFN expert 0 with weight 0: shapes stay static (no host sync), and those rows add nothing."""
        ids, weights = route.expert_ids, route.gate_weights
        if self.cfg.num_routes == self.cfg.num_experts:
            return ids, weights
        other = ids >= self.cfg.num_experts
        return ids.masked_fill(other, 0), weights.masked_fill(other, 0.0)

    def zero_computation(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """MoE++: the gate-weighted outputs of the copy and constant experts (zero experts add nothing)."""
        cfg = self.cfg
        dense = route.gate_weights.new_zeros(x.shape[0], cfg.num_routes)
        dense = dense.scatter_add(1, route.expert_ids, route.gate_weights)  # [T, num_routes]
        first_copy = cfg.num_experts + cfg.num_zero_experts
        first_constant = first_copy + cfg.num_copy_experts
        y = dense[:, first_copy:first_constant].sum(dim=-1, keepdim=True) * x.float()
        if self.constant_experts is not None:
            y = y + torch.einsum("tc,tch->th", dense[:, first_constant:], self.constant_experts(x.float()))
        return y.to(x.dtype)

'''


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    b = edits.file("pithtrain/models/blocks.py")
    b.replace("from dataclasses import dataclass\n", "from dataclasses import dataclass, replace\n")
    b.before_line('    def validate(self, prefix: str = "model.router") -> None:', CONFIG_FIELDS)
    b.before_line("        if self.num_experts < 1:", CONFIG_CHECKS)
    b.after_line(
        "    load: torch.Tensor  # [E]",
        "    logits: torch.Tensor | None = None  # [T, E] fp32 router logits (with the gating residual)\n",
    )
    # Router: the gating residual
    b.after_line(
        "        self.balance_group = None",
        "        if cfg.gating_residual:  # MoE++: logits += residual_weight @ previous MoE layer's logits\n"
        "            self.residual_weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.num_experts))\n",
    )
    b.replace(
        "    def forward(self, x: torch.Tensor, batch_size: int = 1) -> RouterOutput:\n",
        "    def forward(\n"
        "        self, x: torch.Tensor, batch_size: int = 1, residual: torch.Tensor | None = None\n"
        "    ) -> RouterOutput:\n",
    )
    b.after_line(
        "        logits = F.linear(x.float(), self.weight.float())",
        "        if residual is not None:  # MoE++ gating residual: the previous MoE layer's logits [T, E]\n"
        "            logits = logits + F.linear(residual.float(), self.residual_weight.float())\n",
    )
    b.replace(
        "return RouterOutput(expert_ids, weights, lb_loss, z_loss, load)",
        "return RouterOutput(expert_ids, weights, lb_loss, z_loss, load, logits)",
    )
    # MoE: constant experts, zero-computation outputs, the residual passed to the router
    b.before_line("class GroupedExperts(nn.Module):", CONSTANT_EXPERTS)
    b.replace(
        "        self.gate = Router(hidden_size, router)\n",
        "        self.cfg = router\n        self.gate = Router(hidden_size, router.routing())\n",
    )
    b.after_line(
        "        self.experts = GroupedExperts(router.num_experts,",
        "        self.constant_experts = (\n"
        "            ConstantExperts(router.num_constant_experts, hidden_size)"
        " if router.num_constant_experts else None\n"
        "        )\n",
    )
    b.replace(
        "    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:\n",
        MOE_METHODS + "    def forward(\n"
        "        self, x: torch.Tensor, residual: torch.Tensor | None = None\n"
        "    ) -> tuple[torch.Tensor, RouterOutput]:\n",
    )
    b.replace(
        "route = self.gate(flat, batch_size=batch)",
        "route = self.gate(flat, batch_size=batch, residual=residual)",
    )
    pad = b.indent("route = self.gate(flat")
    b.after_line("route = self.gate(flat", f"{pad}ids, weights = self.ffn_routes(route)\n")
    b.replace("self.experts(flat, route.expert_ids, route.gate_weights)", "self.experts(flat, ids, weights)")
    b.replace(
        "self.ep(flat, route.expert_ids, route.gate_weights, self.experts)",
        "self.ep(flat, ids, weights, self.experts)",
    )
    b.before_line(
        "        if self.shared_experts is not None:\n            with",
        "        if self.cfg.num_routes > self.cfg.num_experts:\n"
        "            y = y + self.zero_computation(flat, route)\n",
    )
    # decoder loop: each MoE layer's logits become the next MoE layer's residual
    b.before_line(
        "    routes = []\n    for layer in model.layers.values():",
        "    residual = None  # MoE++ gating residual\n",
    )
    b.replace(
        "checkpoint(layer, h, cos, sin, use_reentrant=False)",
        "checkpoint(layer, h, cos, sin, residual, use_reentrant=False)",
    )
    b.replace("h, route = layer(h, cos, sin)\n", "h, route = layer(h, cos, sin, residual)\n")
    b.after_line(
        "            routes.append(route)",
        "            residual = route.logits if model.cfg.router.gating_residual else None\n",
    )

    models = [edits.file(f"pithtrain/models/{name}.py") for name in ("deepseek_v2", "qwen3_moe")]
    for m in models:
        m.replace(
            "    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):\n",
            "    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, residual=None):\n",
        )
        m.replace("y, route = self.mlp(h)", "y, route = self.mlp(h, residual)")

    c = edits.file("pithtrain/config.py")
    c.before_line(
        "    experts = cfg.model.router.num_experts\n",
        "    r = cfg.model.router\n"
        "    if p.pp > 1 and (r.num_routes > r.num_experts or r.gating_residual):\n"
        '        raise ConfigError("model.router zero/copy/constant experts and gating_residual are not "\n'
        '                          "supported with parallel.pp > 1")\n',
    )
    edits.write()  # only now: every anchor was found
    print("apply.py: MoE++ added (model.router.num_zero/copy/constant_experts, model.router.gating_residual)")


if __name__ == "__main__":
    main()
