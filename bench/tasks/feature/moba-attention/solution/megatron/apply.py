"""Oracle edit for feature/moba-attention on Megatron-Core: TransformerConfig.moba_block_size / moba_topk (checked in
__post_init__) and the call of megatron/core/transformer/moba.py in DotProductAttention, the core attention of the
local layer spec (ate_run/pretrain_gpt.py's LocalAttention subclasses it).

    python apply.py <workspace>

Each edit replaces one exact anchor of Megatron-Core 0.16.1's source; an anchor found other than once stops it with
exit status 1 before any file is written.
"""

import sys
from pathlib import Path

from source_edit import SourceEdits

SHARED = Path(__file__).parent / "shared"  # the operator and its tests, the same on every framework

FIELD_ANCHOR = '''    num_attention_heads: int = field(default=0, metadata={"argparse_meta": {"default": None}})
    """Number of transformer attention heads."""
'''
FIELDS = '''
    moba_block_size: int = 0
    """MoBA attention (megatron/core/transformer/moba.py) over key blocks of this many positions in every layer's
    DotProductAttention; 0: dense causal attention."""

    moba_topk: int = 3
    """MoBA: key blocks each query attends to, its own block included."""
'''
POST_INIT_ANCHOR = '''        details.
        """
        super().__post_init__()
        if self.fp16 and self.bf16:
'''
CHECK = """        if self.moba_block_size < 0:
            raise ValueError(f"moba_block_size must be >= 0 (0: dense attention), got {self.moba_block_size}")
        if self.moba_topk < 1:
            raise ValueError(f"moba_topk must be >= 1, got {self.moba_topk}")
"""
IMPORT_ANCHOR = "from megatron.core.transformer.enums import AttnMaskType\n"
FORWARD_ANCHOR = """        assert attention_bias is None, "Attention bias is not supported for DotProductAttention."
"""
MOBA_CALL = """        if self.config.moba_block_size:  # MoBA: causal attention over the chosen key blocks only
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            dropout = self.config.attention_dropout if self.training else 0.0
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = moba_attention(q, k, v, self.config.moba_block_size, self.config.moba_topk,
                                         scale=self.softmax_scale, dropout_p=dropout)
            return context.permute(2, 0, 1, 3).flatten(2)  # [sq, b, hp]
"""
EDITS = {  # file: [(anchor, its replacement)]
    "megatron/core/transformer/transformer_config.py": [
        (FIELD_ANCHOR, FIELD_ANCHOR + FIELDS),
        (
            POST_INIT_ANCHOR,
            POST_INIT_ANCHOR.replace(
                "        super().__post_init__()\n", "        super().__post_init__()\n" + CHECK
            ),
        ),
    ],
    "megatron/core/transformer/dot_product_attention.py": [
        (IMPORT_ANCHOR, IMPORT_ANCHOR + "from megatron.core.transformer.moba import moba_attention\n"),
        (FORWARD_ANCHOR, FORWARD_ANCHOR + MOBA_CALL),
    ],
}


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    edits.replace_each((rel, old, new) for rel, pairs in EDITS.items() for old, new in pairs)
    edits.add_file("megatron/core/transformer/moba.py", (SHARED / "moba.py").read_text())
    tests = (SHARED / "test_moba.py").read_text()
    edits.add_file("tests/test_moba.py", tests.replace("from moba import", "from megatron.core.transformer.moba import"))
    edits.write()  # only now: every anchor was found and neither new file existed
    print("apply.py: MoBA added (TransformerConfig.moba_block_size, moba_topk)")


if __name__ == "__main__":
    main()
