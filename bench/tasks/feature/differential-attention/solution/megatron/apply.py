"""Oracle edit for feature/differential-attention on Megatron-Core: `TransformerConfig.diff_attention` and the
differential attention of Ye et al. 2024 in MultiLatentAttention.

    python apply.py   (from the workspace root)

Each edit replaces one exact anchor of megatron-core 0.16.1; an anchor found other than once stops it (exit 1)
before any file is written.
"""

import sys

from source_edit import SourceEdits

CONFIG = "megatron/core/transformer/transformer_config.py"
MLA = "megatron/core/transformer/multi_latent_attention.py"

EDITS = [
    (
        CONFIG,
        '''    multi_latent_attention: bool = False
    """Whether to use multi-latent attention."""
''',
        '''    multi_latent_attention: bool = False
    """Whether to use multi-latent attention."""

    diff_attention: bool = False
    """Differential attention (Ye et al. 2024) in multi-latent attention: heads pair up into
    num_attention_heads / 2 differential heads (MultiLatentAttention.differential_attention)."""
''',
    ),
    (
        CONFIG,
        """        if self.num_attention_heads % self.tensor_model_parallel_size != 0:
""",
        """        if self.diff_attention and self.num_attention_heads % 2:
            raise ValueError(
                f"model.diff_attention = true pairs heads: num_attention_heads "
                f"({self.num_attention_heads}) must be even."
            )
        if self.diff_attention and not self.multi_latent_attention:
            raise ValueError("model.diff_attention = true needs multi_latent_attention = true.")

        if self.num_attention_heads % self.tensor_model_parallel_size != 0:
""",
    ),
    (
        MLA,
        """        # Output.
        self.linear_proj = build_module(
""",
        """        if self.config.diff_attention:
            # Differential attention: lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init,
            # lambda_init by the 0-based layer index (layer_number - 1), and an RMSNorm over each differential
            # head's 2 * v_head_dim features; all shared by the layer's heads.
            self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (self.layer_number - 1))
            device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                param = torch.nn.Parameter(
                    torch.zeros(self.q_head_dim, dtype=self.config.params_dtype, device=device)
                )
                if self.config.perform_initialization:
                    torch.nn.init.normal_(param, mean=0.0, std=0.1)  # zeros would give no gradient
                self.register_parameter(name, param)
            self.head_norm = torch.nn.RMSNorm(
                2 * self.config.v_head_dim,
                eps=self.config.layernorm_epsilon,
                device=device,
                dtype=self.config.params_dtype,
            )

        # Output.
        self.linear_proj = build_module(
""",
    ),
    (
        MLA,
        """        if self.checkpoint_core_attention and self.training:
            core_attn_out = self._checkpointed_attention_forward(
""",
        """        if self.config.diff_attention:
            core_attn_out = self.differential_attention(query, key, value)
        elif self.checkpoint_core_attention and self.training:
            core_attn_out = self._checkpointed_attention_forward(
""",
    ),
    (
        MLA,
        """class MLASelfAttention(MultiLatentAttention):
""",
        '''    def differential_attention(self, query, key, value):
        """Differential attention (Ye et al. 2024) on MLA's query, key [s, b, n, qk] and value [s, b, n, v_head_dim]
        -> [s, b, n * v_head_dim]. Differential head j pairs heads 2j and 2j+1, with s = self.softmax_scale:

            out_j = (softmax(s q_2j k_2j^T + causal) - lambda * softmax(s q_2j+1 k_2j+1^T + causal)) [v_2j, v_2j+1]
            out_j <- (1 - lambda_init) * head_norm(out_j)

        Both maps multiply the same values, so each is one causal scaled_dot_product_attention."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        values = torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)  # [b, n/2, s, 2 * v_head_dim]
        attend = lambda i: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q[:, i::2], k[:, i::2], values, is_causal=True, scale=self.softmax_scale
        )
        lam = (
            torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
            - torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
            + self.lambda_init
        )
        out = attend(0) - lam.to(values.dtype) * attend(1)
        out = self.head_norm(out) * (1 - self.lambda_init)
        return out.permute(2, 0, 1, 3).flatten(2)


class MLASelfAttention(MultiLatentAttention):
''',
    ),
]


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    edits.replace_each(EDITS)
    edits.write()  # only now: every anchor was found


if __name__ == "__main__":
    main()
