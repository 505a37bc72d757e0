"""Oracle of feature/moe-plus-plus on Megatron-Core: add MoE++ (zero, copy and constant experts, gating residuals)
to a Megatron-Core workspace.

    python apply.py <workspace>

New code (the TransformerConfig fields and their checks, MoEConstantExperts, the router's residual weight, the MoE
layer's zero-computation experts, MoEGatingResidual: the router logits handed from MoE layer to MoE layer within one
TransformerBlock forward) plus small hooks, each placed by an anchor that must occur exactly once; a missing anchor stops with a message and leaves every
file untouched.
"""

import sys

from source_edit import SourceEdits

CONFIG_FIELDS = '''
    moe_zero_experts: int = 0
    """MoE++ (Jin et al. 2024): zero experts (f(x) = 0) routed beside the num_moe_experts FFN experts. The router
    chooses among num_moe_experts + moe_zero_experts + moe_copy_experts + moe_constant_experts experts, indexed in
    that order; num_moe_experts stays the number of FFN experts."""

    moe_copy_experts: int = 0
    """MoE++ copy experts: f(x) = x."""

    moe_constant_experts: int = 0
    """MoE++ constant experts: f_c(x) = a0 * x + a1 * v_c, (a0, a1) = softmax(A_c x), A_c and v_c trainable."""

    moe_router_gating_residual: bool = False
    """MoE++ gating residual: a MoE layer's router logits are W x + R z, z the previous MoE layer's logits."""
'''

CONFIG_CHECKS = """\
        for key in ("moe_zero_experts", "moe_copy_experts", "moe_constant_experts"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {getattr(self, key)!r}")
        moe_plus_plus = self.moe_zero_experts + self.moe_copy_experts + self.moe_constant_experts > 0
        if moe_plus_plus or self.moe_router_gating_residual:
            for key in ("expert_model_parallel_size", "pipeline_model_parallel_size"):
                if getattr(self, key) > 1:
                    raise ValueError(f"{key} > 1 is not supported with MoE++ (moe_zero_experts, moe_copy_experts, "
                                     "moe_constant_experts, moe_router_gating_residual)")
            if self.cuda_graph_impl != "none" or self.moe_latent_size or self.moe_router_num_groups:
                raise ValueError("MoE++ does not support cuda_graph_impl, moe_latent_size or moe_router_num_groups")
        if self.moe_router_gating_residual and (self.recompute_granularity == "full" or (
                self.recompute_granularity == "selective" and {"moe", "mlp"} & set(self.recompute_modules or []))):
            raise ValueError("moe_router_gating_residual does not support recompute_granularity='full' or "
                             "recompute_modules 'moe' / 'mlp'")
"""

CONSTANT_EXPERTS = '''

class MoEConstantExperts(MegatronModule):
    """MoE++ constant experts: expert c maps x to a0 * x + a1 * value[c], (a0, a1) = softmax(w_mix[c] @ x)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        num, hidden = config.moe_constant_experts, config.hidden_size
        self.w_mix = torch.nn.Parameter(torch.empty(num, 2, hidden, dtype=config.params_dtype))
        self.value = torch.nn.Parameter(torch.empty(num, hidden, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.w_mix)
            config.init_method(self.value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> every constant expert's output [T, K, H] (in x's dtype)."""
        mix = torch.einsum("th,cjh->tcj", x, self.w_mix.to(x.dtype)).softmax(dim=-1)
        return mix[..., :1] * x[:, None, :] + mix[..., 1:] * self.value.to(x.dtype)


def moe_routing_config(config: TransformerConfig) -> TransformerConfig:
    """The router's view of the config: with MoE++ it chooses among every expert, FFN, zero, copy and constant, so
    its weight, scores, aux and z losses and expert bias cover them all."""
    extra = config.moe_zero_experts + config.moe_copy_experts + config.moe_constant_experts
    if not extra:
        return config
    view = copy.copy(config)
    view.num_moe_experts = config.num_moe_experts + extra
    return view

'''

GATING_RESIDUAL = '''

class MoEGatingResidual:
    """MoE++ gating residual of one forward pass, handed to every MoE layer's router in layer order: `logits` holds the
    latest router's logits z [T, N] (None before the first MoE layer); the next router adds R z to its own W x and
    leaves its result here. Not kept on any module: TransformerBlock makes a new one per forward."""

    def __init__(self, logits: Optional[torch.Tensor] = None):
        self.logits = logits

    def apply(self, logits: torch.Tensor, residual_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """logits [S, B, N] of W x -> z = W x + R z_prev (z_prev = self.logits); z [T, N] is kept for the next."""
        if self.logits is not None:
            if residual_weight is None:
                raise ValueError("a router residual was given but moe_router_gating_residual is off")
            r = F.linear(self.logits.to(logits.dtype), residual_weight.to(logits.dtype))
            logits = logits + r.view(logits.shape)
        self.logits = logits.view(-1, logits.shape[-1])
        return logits

'''

ZERO_COMPUTATION = '''\
    def zero_computation(self, hidden_states: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """MoE++: the weighted outputs of the copy and constant experts (zero experts add nothing), from the
        router's combine weights probs [T, N] over all N experts; -> hidden_states' shape and dtype."""
        cfg = self.config
        first_copy = cfg.num_moe_experts + cfg.moe_zero_experts
        first_constant = first_copy + cfg.moe_copy_experts
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        w = probs.float()
        y = w[:, first_copy:first_constant].sum(dim=-1, keepdim=True) * x
        if self.constant_experts is not None:
            y = y + torch.einsum("tc,tch->th", w[:, first_constant:], self.constant_experts(x))
        return y.to(hidden_states.dtype).view(hidden_states.shape)

'''


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    config = edits.file("megatron/core/transformer/transformer_config.py")
    config.after_line('    """Number of experts to route to for each token."""', CONFIG_FIELDS)
    config.replace(
        "        super().__post_init__()\n        if self.fp16 and self.bf16:",
        "        super().__post_init__()\n" + CONFIG_CHECKS + "        if self.fp16 and self.bf16:",
    )

    router = edits.file("megatron/core/transformer/moe/router.py")
    router.replace("import torch\n", "import torch\nimport torch.nn.functional as F\n")
    router.replace("\n\nclass Router(ABC, MegatronModule):", GATING_RESIDUAL + "\nclass Router(ABC, MegatronModule):")
    router.after_line(
        "        self.input_jitter = None",
        "        # MoE++ gating residual R [N, N]: logits = W x + R z, z the previous MoE layer's logits\n"
        "        self.residual_weight = None\n"
        "        if self.config.moe_router_gating_residual:\n"
        "            n = self.config.num_moe_experts\n"
        "            self.residual_weight = torch.nn.Parameter(\n"
        "                torch.empty((n, n), dtype=torch.float32, device=self.weight.device)\n"
        "            )\n"
        "            if self.config.perform_initialization:\n"
        "                self.config.init_method(self.residual_weight)\n"
        "            self.residual_weight.data = self.residual_weight.data.to(dtype=self.config.params_dtype)\n",
    )
    router.replace(
        "    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):\n",
        "    def forward(\n"
        "        self,\n"
        "        input: torch.Tensor,\n"
        "        padding_mask: Optional[torch.Tensor] = None,\n"
        "        gating_residual: Optional[MoEGatingResidual] = None,\n"
        "    ):\n",
    )
    router.replace(
        "        logits = self.gating(input)\n\n        if self.config.moe_router_force_load_balancing:",
        "        logits = self.gating(input)\n"
        "        if gating_residual is not None:  # MoE++: logits += R z, z the previous MoE layer's logits\n"
        "            logits = gating_residual.apply(logits, self.residual_weight)\n"
        "\n"
        "        if self.config.moe_router_force_load_balancing:",
    )

    layer = edits.file("megatron/core/transformer/moe/moe_layer.py")
    layer.replace("from abc import ABC, abstractmethod\n", "import copy\nfrom abc import ABC, abstractmethod\n")
    layer.replace(
        "from megatron.core.transformer.moe.router import TopKRouter\n",
        "from megatron.core.transformer.moe.router import MoEGatingResidual, TopKRouter\n",
    )
    layer.replace("\n\nclass BaseMoELayer(MegatronModule, ABC):", CONSTANT_EXPERTS + "\nclass BaseMoELayer(MegatronModule, ABC):")
    layer.replace(
        "        self.router = submodules.router(config=self.config, pg_collection=pg_collection)\n",
        "        self.router = submodules.router(config=moe_routing_config(self.config), pg_collection=pg_collection)\n"
        "        self.constant_experts = MoEConstantExperts(self.config) if self.config.moe_constant_experts else None\n",
    )
    layer.replace(
        '    @maybe_skip_or_early_return_by_cudagraph("route")\n'
        "    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):\n",
        ZERO_COMPUTATION + '    @maybe_skip_or_early_return_by_cudagraph("route")\n'
        "    def route(\n"
        "        self,\n"
        "        hidden_states: torch.Tensor,\n"
        "        padding_mask: Optional[torch.Tensor] = None,\n"
        "        gating_residual: Optional[MoEGatingResidual] = None,\n"
        "    ):\n",
    )
    layer.replace(
        "        probs, routing_map = apply_module(self.router)(hidden_states, padding_mask)\n",
        '        kw = {} if gating_residual is None else {"gating_residual": gating_residual}  # MoE++\n'
        "        probs, routing_map = apply_module(self.router)(hidden_states, padding_mask, **kw)\n",
    )
    layer.replace(
        "        intermediate_tensors=None,\n"
        "        padding_mask: Optional[torch.Tensor] = None,\n"
        "    ):\n"
        '        """Forward pass for the MoE layer.\n',
        "        intermediate_tensors=None,\n"
        "        padding_mask: Optional[torch.Tensor] = None,\n"
        "        gating_residual: Optional[MoEGatingResidual] = None,\n"
        "    ):\n"
        '        """Forward pass for the MoE layer. MoE++: `gating_residual` carries the previous MoE layer\'s router\n'
        "        logits into this layer's router and takes this layer's back out.\n",
    )
    layer.replace(
        "            try:\n",
        "            zero_computation = None  # MoE++: the zero, copy and constant experts' output\n            try:\n",
    )
    layer.replace(
        "                    probs, routing_map = self.route(hidden_states, padding_mask)\n",
        "                    probs, routing_map = self.route(hidden_states, padding_mask, gating_residual)\n"
        "                    num_ffn = self.config.num_moe_experts\n"
        "                    if probs.shape[-1] > num_ffn:  # MoE++: the dispatcher and experts see the FFN ones\n"
        "                        zero_computation = self.zero_computation(hidden_states, probs)\n"
        "                        probs = probs[:, :num_ffn].contiguous()\n"
        "                        routing_map = routing_map[:, :num_ffn].contiguous()\n",
    )
    layer.replace(
        "                output = self.postprocess(output, shared_expert_output)\n",
        "                output = self.postprocess(output, shared_expert_output)\n"
        "                if zero_computation is not None:\n"
        "                    output = output + zero_computation\n",
    )

    tl = edits.file("megatron/core/transformer/transformer_layer.py")
    tl.replace(
        '        kwargs.pop("dynamic_inference_decode_only", None)\n'
        "        hidden_states, context = self._forward_attention(*args, **kwargs)\n"
        "        output = self._forward_mlp(\n"
        "            hidden_states,\n"
        '            kwargs.get("inference_context", None),\n'
        '            padding_mask=kwargs.get("padding_mask", None),\n'
        "        )\n",
        '        kwargs.pop("dynamic_inference_decode_only", None)\n'
        '        gating_residual = kwargs.pop("gating_residual", None)  # MoE++: for a MoE layer\'s router\n'
        "        hidden_states, context = self._forward_attention(*args, **kwargs)\n"
        '        mlp_kw = {} if gating_residual is None else {"gating_residual": gating_residual}\n'
        "        output = self._forward_mlp(\n"
        "            hidden_states,\n"
        '            kwargs.get("inference_context", None),\n'
        '            padding_mask=kwargs.get("padding_mask", None),\n'
        "            **mlp_kw,\n"
        "        )\n",
    )
    tl.replace(
        "    def _forward_mlp(self, hidden_states, inference_context=None, padding_mask=None):\n"
        '        """\n'
        "        Perform a forward pass through the feed-forward layer.\n",
        "    def _forward_mlp(\n"
        "        self, hidden_states, inference_context=None, padding_mask=None, gating_residual=None\n"
        "    ):\n"
        '        """\n'
        "        Perform a forward pass through the feed-forward layer (gating_residual: MoE++'s\n"
        "        MoEGatingResidual, for a MoE layer's router).\n",
    )
    tl.replace(
        "            mlp_output_with_bias = self.mlp(pre_mlp_layernorm_output, padding_mask=padding_mask)\n",
        '            mlp_kw = {} if gating_residual is None else {"gating_residual": gating_residual}\n'
        "            mlp_output_with_bias = self.mlp(\n"
        "                pre_mlp_layernorm_output, padding_mask=padding_mask, **mlp_kw\n"
        "            )\n",
    )

    block = edits.file("megatron/core/transformer/transformer_block.py")
    block.after_line(
        "from megatron.core.transformer.module import GraphableMegatronModule, MegatronModule",
        "from megatron.core.transformer.moe.router import MoEGatingResidual\n",
    )
    block.before_line(
        "                for l_no, layer in enumerate(self.layers):",
        "                # MoE++ gating residual: each MoE layer's router logits go to the next MoE layer's router\n"
        "                gating_residual = MoEGatingResidual() if self.config.moe_router_gating_residual else None\n",
    )
    block.replace(
        "                            sequence_len_offset=sequence_len_offset,\n"
        "                            padding_mask=padding_mask,\n"
        "                        )\n",
        "                            sequence_len_offset=sequence_len_offset,\n"
        "                            padding_mask=padding_mask,\n"
        "                            **({} if gating_residual is None else {\"gating_residual\": gating_residual}),\n"
        "                        )\n",
    )
    edits.write()  # only now: every anchor was found
    print("apply.py: MoE++ added ([model] moe_zero_experts, moe_copy_experts, moe_constant_experts, "
          "moe_router_gating_residual)")


if __name__ == "__main__":
    main()
