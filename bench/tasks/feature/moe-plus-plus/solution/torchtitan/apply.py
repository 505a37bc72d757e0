"""Oracle of feature/moe-plus-plus on TorchTitan: adds MoE++ (zero, copy and constant experts, gating residuals) to
torchtitan/models/moe/moe.py and the DeepSeek-V3 decoder loop, plus the `tiny_moepp` flavor to ate_run.

    python apply.py <workspace>

Each edit replaces an exact piece of TorchTitan 0.2.2's source that must occur exactly once; a piece not found stops
with a message naming it and leaves every file untouched.
"""

import sys

from source_edit import SourceEdits

MOE_ARGS = (
    "    _debug_force_load_balance: bool = False\n"
    "    # if True, we force each experts get same amount of token via round-robin\n",
    "    _debug_force_load_balance: bool = False\n"
    "    # if True, we force each experts get same amount of token via round-robin\n"
    "\n"
    "    # MoE++ (Jin et al., 2024): zero (f(x) = 0), copy (f(x) = x) and constant experts (f_c(x) = a0 x + a1 v_c,\n"
    "    # (a0, a1) = softmax(A_c x)) routed beside the num_experts FFN experts, choices indexed FFN, zero, copy,\n"
    "    # constant; gating residual: router logits z = W x + R z_prev of the previous MoE layer's logits.\n"
    "    num_zero_experts: int = 0\n"
    "    num_copy_experts: int = 0\n"
    "    num_constant_experts: int = 0\n"
    "    gating_residual: bool = False\n"
    "\n"
    "    def __post_init__(self):\n"
    '        for key in ("num_zero_experts", "num_copy_experts", "num_constant_experts"):\n'
    "            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:\n"
    '                raise ValueError(f"moe_args.{key} must be an integer >= 0, got {getattr(self, key)!r}")\n'
    "\n"
    "    @property\n"
    "    def num_choices(self) -> int:\n"
    '        """N: what the router chooses among (FFN experts, then zero, copy and constant experts)."""\n'
    "        return self.num_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts\n",
)

CONSTANT_EXPERTS = (
    "class TokenChoiceTopKRouter(nn.Module):\n",
    "class ConstantExperts(nn.Module):\n"
    '    """MoE++ constant experts: f_c(x) = a0 * x + a1 * value[c], (a0, a1) = softmax(w_mix[c] @ x)."""\n'
    "\n"
    "    def __init__(self, dim: int, num: int):\n"
    "        super().__init__()\n"
    "        self.w_mix = nn.Parameter(torch.empty(num, 2, dim))\n"
    "        self.value = nn.Parameter(torch.empty(num, dim))\n"
    "\n"
    "    def forward(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:\n"
    '        """x [M, H], which [M] in [0, K): each row through its own constant expert."""\n'
    "        mix = (x.float() @ self.w_mix.flatten(0, 1).float().T).view(x.shape[0], -1, 2)\n"
    "        a = mix[torch.arange(x.shape[0], device=x.device), which].softmax(-1)\n"
    "        return (a[:, :1] * x.float() + a[:, 1:] * self.value[which].float()).to(x.dtype)\n"
    "\n"
    "    def init_weights(self, init_std: float):\n"
    "        trunc_normal_(self.w_mix, mean=0.0, std=init_std)\n"
    "        trunc_normal_(self.value, mean=0.0, std=init_std)\n"
    "\n"
    "\n"
    "class TokenChoiceTopKRouter(nn.Module):\n",
)

ROUTER_INIT = (
    "        gate_bias: bool,\n"
    "        _debug_force_load_balance: bool = False,\n"
    "    ):\n"
    "        super().__init__()\n"
    "        self.gate = nn.Linear(dim, num_experts, bias=gate_bias)\n",
    "        gate_bias: bool,\n"
    "        _debug_force_load_balance: bool = False,\n"
    "        gating_residual: bool = False,\n"
    "    ):\n"
    "        super().__init__()\n"
    "        # num_experts: every routing choice (MoE++: FFN, zero, copy and constant experts)\n"
    "        self.gate = nn.Linear(dim, num_experts, bias=gate_bias)\n"
    "        # MoE++ gating residual R [N, N]: logits z = gate(x) + z_prev @ R^T\n"
    "        self.residual_weight = nn.Parameter(torch.empty(num_experts, num_experts)) if gating_residual else None\n",
)

ROUTER_FWD = (
    "    def forward(\n"
    "        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None\n"
    "    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:\n",
    "    def forward(\n"
    "        self,\n"
    "        x: torch.Tensor,\n"
    "        expert_bias: torch.Tensor | None = None,\n"
    "        residual: torch.Tensor | None = None,\n"
    "    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:\n",
)

ROUTER_SCORES = (
    "        # scores shape (bs*slen, num_experts)\n"
    "        scores = self.gate(x)\n"
    "\n"
    "        # By default, sigmoid or softmax is performed in float32 to avoid loss explosion\n"
    '        if self.score_func == "sigmoid":\n'
    "            scores = torch.sigmoid(scores.to(torch.float32))\n"
    '        elif self.score_func == "softmax":\n'
    "            scores = F.softmax(scores.to(torch.float32), dim=1)\n",
    "        # logits (bs*slen, num_experts) in fp32; MoE++ gating residual: + residual @ R^T, residual being the\n"
    "        # previous MoE layer's logits (residual term included)\n"
    "        logits = self.gate(x).to(torch.float32)\n"
    "        if residual is not None:\n"
    "            if self.residual_weight is None:\n"
    '                raise ValueError("a router residual was given but moe_args.gating_residual is off")\n'
    "            logits = logits + residual.to(torch.float32) @ self.residual_weight.to(torch.float32).T\n"
    "\n"
    "        # By default, sigmoid or softmax is performed in float32 to avoid loss explosion\n"
    '        if self.score_func == "sigmoid":\n'
    "            scores = torch.sigmoid(logits)\n"
    '        elif self.score_func == "softmax":\n'
    "            scores = F.softmax(logits, dim=1)\n",
)

ROUTER_RET = (
    "        return top_scores, selected_experts_indices, num_tokens_per_expert\n"
    "\n"
    "    def init_weights(self, init_std: float):\n"
    "        trunc_normal_(self.gate.weight, mean=0.0, std=init_std)\n",
    "        return top_scores, selected_experts_indices, num_tokens_per_expert, logits\n"
    "\n"
    "    def init_weights(self, init_std: float):\n"
    "        trunc_normal_(self.gate.weight, mean=0.0, std=init_std)\n"
    "        if self.residual_weight is not None:\n"
    "            trunc_normal_(self.residual_weight, mean=0.0, std=init_std)\n",
)

MOE_INIT = (
    "        self.router = TokenChoiceTopKRouter(\n"
    "            dim=dim,\n"
    "            num_experts=num_experts,\n",
    "        # MoE++: the router and the load statistics cover all N choices; the grouped experts only the FFN ones\n"
    "        num_experts = moe_args.num_choices\n"
    "        self.zero_copy_constant = (\n"
    "            moe_args.num_experts,\n"
    "            moe_args.num_zero_experts,\n"
    "            moe_args.num_copy_experts,\n"
    "            moe_args.num_constant_experts,\n"
    "        )\n"
    "        self.constant_experts = (\n"
    "            ConstantExperts(dim, moe_args.num_constant_experts) if moe_args.num_constant_experts > 0 else None\n"
    "        )\n"
    "        self.router = TokenChoiceTopKRouter(\n"
    "            dim=dim,\n"
    "            num_experts=num_experts,\n",
)

MOE_INIT2 = (
    "            _debug_force_load_balance=moe_args._debug_force_load_balance,\n"
    "        )\n"
    "        self.reorderer",
    "            _debug_force_load_balance=moe_args._debug_force_load_balance,\n"
    "            gating_residual=moe_args.gating_residual,\n"
    "        )\n"
    "        self.reorderer",
)

MOE_FWD = (
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    '        """\n'
    "        Args:\n"
    "            x (torch.Tensor): Input tensor with shape ``(bs, slen, dim)``.\n",
    "    def forward(\n"
    "        self, x: torch.Tensor, residual: torch.Tensor | None = None\n"
    "    ) -> tuple[torch.Tensor, torch.Tensor]:\n"
    '        """MoE++: residual is the previous MoE layer\'s router logits (bs*slen, N) or None.\n'
    "        Returns (output (bs, slen, dim), this layer's router logits (bs*slen, N), fp32).\n"
    "\n"
    "        Args:\n"
    "            x (torch.Tensor): Input tensor with shape ``(bs, slen, dim)``.\n",
)

MOE_ROUTE = (
    "        ) = self.router(x, self.expert_bias)\n",
    "            logits,\n        ) = self.router(x, self.expert_bias, residual)\n",
)

MOE_EXPERTS = (
    "        # shape (bs*slen*top_k, dim)\n"
    "        routed_output = self.experts(routed_input, num_tokens_per_expert)\n",
    "        # shape (bs*slen*top_k, dim); rows sorted by choice, FFN experts first: the grouped experts see the\n"
    "        # FFN rows (the rest is their padding) and MoE++'s zero, copy and constant experts fill in the others\n"
    "        num_ffn, num_zero, num_copy, num_constant = self.zero_copy_constant\n"
    "        routed_output = self.experts(routed_input, num_tokens_per_expert[:num_ffn])\n"
    "        if num_zero + num_copy + num_constant > 0:\n"
    "            choice = selected_experts_indices.view(-1)[token_indices_experts_sorted][:, None]\n"
    "            routed_output = torch.where(choice < num_ffn, routed_output, 0.0)\n"
    "            first_copy, first_constant = num_ffn + num_zero, num_ffn + num_zero + num_copy\n"
    "            is_copy = (choice >= first_copy) & (choice < first_constant)\n"
    "            routed_output = torch.where(is_copy, routed_input.to(routed_output.dtype), routed_output)\n"
    "            if self.constant_experts is not None:\n"
    "                raw = x[token_indices_experts_sorted // self.router.top_k]\n"
    "                which = (choice[:, 0] - first_constant).clamp(min=0)\n"
    "                constant = self.constant_experts(raw, which).float()\n"
    "                if self.score_before_experts:\n"
    "                    constant = constant * top_scores_experts_sorted.reshape(-1, 1)\n"
    "                routed_output = torch.where(\n"
    "                    choice >= first_constant, constant.to(routed_output.dtype), routed_output\n"
    "                )\n",
)

MOE_RET = (
    "        if out is None:\n"
    "            return out_experts.reshape(bs, slen, dim)\n"
    "        return (out + out_experts).reshape(bs, slen, dim)\n",
    "        if out is None:\n"
    "            return out_experts.reshape(bs, slen, dim), logits\n"
    "        return (out + out_experts).reshape(bs, slen, dim), logits\n",
)

MOE_WINIT = (
    "        self.experts.init_weights(init_std)\n        self.router.init_weights(init_std)\n",
    "        self.experts.init_weights(init_std)\n"
    "        self.router.init_weights(init_std)\n"
    "        if self.constant_experts is not None:\n"
    "            self.constant_experts.init_weights(init_std)\n",
)

MOE_BUFFERS = (
    "            self.tokens_per_expert = torch.zeros(\n"
    "                self.experts.num_experts, dtype=torch.float32\n"
    "            )\n"
    "            if self.load_balance_coeff is not None:\n"
    "                self.expert_bias = torch.zeros(\n"
    "                    self.experts.num_experts, dtype=torch.float32\n"
    "                )\n",
    "            self.tokens_per_expert = torch.zeros(\n"
    "                self.router.num_experts, dtype=torch.float32\n"
    "            )\n"
    "            if self.load_balance_coeff is not None:\n"
    "                self.expert_bias = torch.zeros(\n"
    "                    self.router.num_experts, dtype=torch.float32\n"
    "                )\n",
)

BLOCK_FWD = (
    "        positions: torch.Tensor | None = None,\n"
    "    ):\n"
    '        """\n'
    "        Forward pass for the Transformer block.\n",
    "        positions: torch.Tensor | None = None,\n"
    "        residual: torch.Tensor | None = None,\n"
    "    ):\n"
    '        """\n'
    "        Forward pass for the Transformer block. Returns (output, router logits of its MoE or None); `residual`\n"
    "        is the previous MoE layer's router logits (MoE++ gating residual).\n",
)

BLOCK_MOE = (
    "        if self.moe_enabled:\n"
    "            x = x + self.moe(self.ffn_norm(x))\n"
    "        else:\n"
    "            x = x + self.feed_forward(self.ffn_norm(x))\n"
    "        return x\n",
    "        if self.moe_enabled:\n"
    "            out, logits = self.moe(self.ffn_norm(x), residual)\n"
    "            return x + out, logits\n"
    "        x = x + self.feed_forward(self.ffn_norm(x))\n"
    "        return x, None\n",
)

MODEL_LOOP = (
    "        for layer in self.layers.values():\n"
    "            h = layer(h, self.freqs_cis, attention_masks, positions)\n",
    "        # MoE++ gating residual: each MoE layer's router logits go to the next MoE layer's router\n"
    "        residual = None\n"
    "        for layer in self.layers.values():\n"
    "            h, logits = layer(h, self.freqs_cis, attention_masks, positions, residual)\n"
    "            if logits is not None and self.model_args.moe_args.gating_residual:\n"
    "                residual = logits\n",
)

FLAVOR = (
    "register_train_spec(NAME,",
    "# MoE++ on the tiny flavor: one zero, one copy and two constant experts beside the 8 FFN experts, gating residuals.\n"
    'FLAVORS["tiny_moepp"] = dataclasses.replace(\n'
    '    FLAVORS["tiny"], moe_args=dataclasses.replace(FLAVORS["tiny"].moe_args, num_zero_experts=1, num_copy_experts=1,\n'
    "                                                 num_constant_experts=2, gating_residual=True))\n"
    "\n"
    "register_train_spec(NAME,",
)

EDITS = {
    "torchtitan/models/moe/moe.py": [
        MOE_ARGS,
        CONSTANT_EXPERTS,
        ROUTER_INIT,
        ROUTER_FWD,
        ROUTER_SCORES,
        ROUTER_RET,
        MOE_INIT,
        MOE_INIT2,
        MOE_FWD,
        MOE_ROUTE,
        MOE_EXPERTS,
        MOE_RET,
        MOE_WINIT,
        MOE_BUFFERS,
    ],
    "torchtitan/models/deepseek_v3/model/model.py": [BLOCK_FWD, BLOCK_MOE, MODEL_LOOP],
    "ate_run/deepseek_v2_lite.py": [FLAVOR],
}


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    for rel, pieces in EDITS.items():
        f = edits.file(rel)
        for old, new in pieces:
            f.replace(old, new)
    edits.write()  # only now: every piece was found
    print("apply.py: MoE++ added (moe_args num_zero/copy/constant_experts, gating_residual; flavor tiny_moepp)")


if __name__ == "__main__":
    main()
