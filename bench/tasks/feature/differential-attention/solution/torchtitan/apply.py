"""Oracle edit for feature/differential-attention on TorchTitan: the job config's `model.diff_attention`, copied into
`DeepSeekV3ModelArgs.diff_attention`, and the differential attention of Ye et al. 2024 in DeepSeek-V3's MLA.

    python apply.py   (from the workspace root)

Each edit replaces one exact anchor of torchtitan 0.2.2; an anchor found other than once stops it (exit 1) before
any file is written.
"""

import sys

from source_edit import SourceEdits

JOB = "torchtitan/config/job_config.py"
ARGS = "torchtitan/models/deepseek_v3/model/args.py"
MODEL = "torchtitan/models/deepseek_v3/model/model.py"

EDITS = [
    (
        JOB,
        """    print_after_conversion: bool = False
""",
        '''    diff_attention: bool = False
    """Differential attention (Ye et al. 2024) in DeepSeek-V3's multi-head latent attention: heads pair up into
    n_heads / 2 differential heads. Copied into the model args by DeepSeekV3ModelArgs.update_from_config."""

    print_after_conversion: bool = False
''',
    ),
    (
        ARGS,
        """    mscale: float = 1.0

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
""",
        """    mscale: float = 1.0

    # Differential attention (job config: model.diff_attention)
    diff_attention: bool = False

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        if job_config.model.diff_attention:
            self.diff_attention = True
        if self.diff_attention and self.n_heads % 2:
            raise ValueError(
                f"model.diff_attention = true pairs heads: n_heads ({self.n_heads}) must be even."
            )
""",
    ),
    (
        MODEL,
        """    def __init__(self, model_args: DeepSeekV3ModelArgs):
        super().__init__()
        self.dim = model_args.dim
""",
        """    def __init__(self, model_args: DeepSeekV3ModelArgs, layer_id: int = 0):
        super().__init__()
        self.dim = model_args.dim
""",
    ),
    (
        MODEL,
        """        self.attn_type = model_args.attn_type
        self.inner_attention: nn.Module
""",
        """        self.diff_attention = model_args.diff_attention
        if self.diff_attention:
            # lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, lambda_init by the
            # 0-based layer index; an RMSNorm over each differential head's 2 * v_head_dim features. All shared by
            # the layer's heads; initialised in init_weights.
            self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_id)
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                self.register_parameter(name, nn.Parameter(torch.empty(self.qk_head_dim)))
            self.head_norm = nn.RMSNorm(2 * self.v_head_dim, eps=model_args.norm_eps)

        self.attn_type = model_args.attn_type
        self.inner_attention: nn.Module
""",
    ),
    (
        MODEL,
        """        match self.attn_type:
            case "flex":
                assert isinstance(attention_masks, BlockMask)
""",
        """        if self.diff_attention:
            return self.wo(self.differential_attention(q, k, v))

        match self.attn_type:
            case "flex":
                assert isinstance(attention_masks, BlockMask)
""",
    ),
    (
        MODEL,
        """    def init_weights(self, init_std: float):
        linear_list = [
""",
        '''    def differential_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Differential attention (Ye et al. 2024) on MLA's q, k (bsz, n_heads, seqlen, qk_head_dim) and v
        (bsz, n_heads, seqlen, v_head_dim) -> (bsz, seqlen, n_heads * v_head_dim). Differential head j pairs heads
        2j and 2j+1, with s = self.softmax_scale and a causal mask:

            out_j = (softmax(s q_2j k_2j^T) - lambda * softmax(s q_2j+1 k_2j+1^T)) [v_2j, v_2j+1]
            out_j <- (1 - lambda_init) * head_norm(out_j)

        Both maps multiply the same values, so each is one causal scaled_dot_product_attention."""
        values = torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)  # (bsz, n_heads / 2, seqlen, 2 * v_head_dim)
        attend = lambda i: F.scaled_dot_product_attention(  # noqa: E731
            q[:, i::2], k[:, i::2], values, is_causal=True, scale=self.softmax_scale
        )
        lam = (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )
        out = self.head_norm(attend(0) - lam * attend(1)) * (1 - self.lambda_init)
        return out.transpose(1, 2).flatten(2)

    def init_weights(self, init_std: float):
        if self.diff_attention:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                nn.init.normal_(getattr(self, name), mean=0.0, std=0.1)  # zeros would give no gradient
            self.head_norm.reset_parameters()
        linear_list = [
''',
    ),
    (
        MODEL,
        """        self.attention = Attention(model_args)
""",
        """        self.attention = Attention(model_args, layer_id)
""",
    ),
    (
        MODEL,
        """import torch
from torch import nn
""",
        """import torch
import torch.nn.functional as F
from torch import nn
""",
    ),
]


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    edits.replace_each(EDITS)
    edits.write()  # only now: every anchor was found


if __name__ == "__main__":
    main()
