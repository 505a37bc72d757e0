"""Oracle edit for feature/moba-attention on TorchTitan: `moba_block_size` / `moba_topk` in the job config's [model]
table and in DeepSeekV3ModelArgs, and the call of torchtitan/models/moba.py in DeepSeek-V3's MLA.

    python apply.py <workspace>

Each edit replaces one exact anchor of TorchTitan 0.2.2's source; an anchor found other than once stops it with exit
status 1 before any file is written.
"""

import sys
from pathlib import Path

from source_edit import SourceEdits

SHARED = Path(__file__).parent / "shared"  # the operator and its tests, the same on every framework

JOB_FIELDS = '''
    moba_block_size: int = 0
    """MoBA attention over key blocks of this many positions in every DeepSeek-V3 layer; 0: dense causal attention"""

    moba_topk: int = 3
    """MoBA: key blocks each query attends to, its own block included"""
'''
ARGS_FIELDS = """
    # MoBA (torchtitan/models/moba.py): 0 = dense causal attention
    moba_block_size: int = 0
    moba_topk: int = 3

    def __post_init__(self) -> None:
        self.check_moba()

    def check_moba(self) -> None:
        if self.moba_block_size < 0:
            raise ValueError(f"model.moba_block_size must be >= 0 (0: dense attention), got {self.moba_block_size}")
        if self.moba_topk < 1:
            raise ValueError(f"model.moba_topk must be >= 1, got {self.moba_topk}")
"""
UPDATE_ANCHOR = "        self.moe_impl = job_config.parallelism.expert_parallel_comm_backend\n"
IMPORT_ANCHOR = "from torchtitan.models.moe import build_moe, FeedForward, MoE\n"
TYPE_ANCHOR = "        self.attn_type = model_args.attn_type\n"
UPDATE = """
        self.moba_block_size = job_config.model.moba_block_size
        self.moba_topk = job_config.model.moba_topk
        self.check_moba()
"""
JOB_ANCHOR = '''    print_after_conversion: bool = False
    """
    If true, model definition will be printed to stdout after all model
    converters have been applied.
    """
'''
MLA_CALL = "                output = self.inner_attention(q, k, v, scale=self.softmax_scale)\n"
EDITS = {  # file: [(anchor, its replacement)]
    "torchtitan/config/job_config.py": [(JOB_ANCHOR, JOB_ANCHOR + JOB_FIELDS)],
    "torchtitan/models/deepseek_v3/model/args.py": [
        ("    mscale: float = 1.0\n", "    mscale: float = 1.0\n" + ARGS_FIELDS),
        (UPDATE_ANCHOR, UPDATE_ANCHOR + UPDATE),
    ],
    "torchtitan/models/deepseek_v3/model/model.py": [
        (IMPORT_ANCHOR, IMPORT_ANCHOR + "from torchtitan.models.moba import moba_attention\n"),
        (
            TYPE_ANCHOR,
            TYPE_ANCHOR
            + """        self.moba_block_size, self.moba_topk = model_args.moba_block_size, model_args.moba_topk
        if self.moba_block_size and self.attn_type != "sdpa":
            raise ValueError(f"model.moba_block_size needs attn_type 'sdpa', got {self.attn_type!r}")
""",
        ),
        (
            MLA_CALL,
            """                if self.moba_block_size:
                    output = moba_attention(
                        q, k, v, self.moba_block_size, self.moba_topk, scale=self.softmax_scale
                    )
                else:
                    output = self.inner_attention(q, k, v, scale=self.softmax_scale)
""",
        ),
    ],
}


def main() -> None:
    edits = SourceEdits(sys.argv[1] if len(sys.argv) > 1 else ".")
    edits.replace_each((rel, old, new) for rel, pairs in EDITS.items() for old, new in pairs)
    edits.add_file("torchtitan/models/moba.py", (SHARED / "moba.py").read_text())
    tests = (SHARED / "test_moba.py").read_text()
    edits.add_file("tests/test_moba.py", tests.replace("from moba import", "from torchtitan.models.moba import"))
    edits.write()  # only now: every anchor was found and neither new file existed
    print("apply.py: MoBA added (model.moba_block_size, model.moba_topk)")


if __name__ == "__main__":
    main()
