"""Oracle edit for feature/moba-attention: `model.moba_block_size` / `model.moba_topk` in PithTrain's DeepSeek-V2.

    python solve.py pithtrain/models/deepseek_v2.py

The operator itself is a new file (../shared/moba.py, copied by solve.sh to pithtrain/ops/moba.py); this script adds the
config keys, their checks and the call in Attention.forward. It finds its places with `ast` (not line numbers
or diff context), so it survives unrelated edits to the file; any place it cannot find exactly once stops it
with exit status 1 and the file untouched.
"""

import ast
import sys

from ast_edit import Anchor, Source, main, method, one, top

CONFIG_FIELDS = """\
    moba_block_size: int = 0  # > 0: MoBA attention (ops/moba.py) over key blocks of this many positions
    moba_topk: int = 3  # MoBA: key blocks each query attends to, its own block included
"""
VALIDATE = """\
        if self.moba_block_size < 0:
            raise ValueError(
                f"model.moba_block_size must be >= 0 (0: dense attention), got {self.moba_block_size}"
            )
        if self.moba_topk < 1:
            raise ValueError(f"model.moba_topk must be >= 1, got {self.moba_topk}")
"""
ATTEND = '''
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q, k [B, heads, S, qk_head_dim] over v [B, heads, S, v_head_dim]: dense, or MoBA
        (ops/moba.py) over blocks of model.moba_block_size keys when that is > 0."""
        if self.cfg.moba_block_size:
            return moba_attention(q, k, v, self.cfg.moba_block_size, self.cfg.moba_topk, scale={scale})
        return {fn}(q, k, v{kwargs})
'''
IMPORT = "from pithtrain.ops.moba import moba_attention\n"


def edit(src: Source) -> None:
    # 1. the config keys and their checks
    cfg_cls = top(src.tree(), ast.ClassDef, "DeepseekV2Config")
    src.insert([n for n in cfg_cls.body if isinstance(n, ast.AnnAssign)][-1].end_lineno, CONFIG_FIELDS)
    validate = method(top(src.tree(), ast.ClassDef, "DeepseekV2Config"), "validate")
    src.insert(validate.end_lineno, VALIDATE)

    # 2. Attention.forward's attention call -> self.attend(q, k, v), which picks MoBA when moba_block_size > 0
    attn = top(src.tree(), ast.ClassDef, "Attention")
    forward = method(attn, "forward")
    stmt = one(
        [
            s
            for s in ast.walk(forward)
            if isinstance(s, ast.Assign)
            and isinstance(s.value, ast.Call)
            and getattr(s.value.func, "attr", None) == "scaled_dot_product_attention"
        ],
        "`out = F.scaled_dot_product_attention(...)` in Attention.forward",
    )
    call = stmt.value
    if len(call.args) != 3:
        raise Anchor("the attention call should take q, k, v positionally")
    scale = [src.segment(kw.value) for kw in call.keywords if kw.arg == "scale"]
    kwargs = "".join(f", {src.segment(kw)}" for kw in call.keywords)
    attend = ATTEND.format(fn=src.segment(call.func), kwargs=kwargs, scale=scale[0] if scale else None)
    src.insert(attn.end_lineno, attend)
    q, k, v = (src.segment(a) for a in call.args)
    indent = src.lines[stmt.lineno - 1][: stmt.col_offset]
    src.replace(
        stmt.lineno, stmt.end_lineno, f"{indent}{src.segment(stmt.targets[0])} = self.attend({q}, {k}, {v})\n"
    )

    # 3. the import, after the file's last `from pithtrain... import` at top level
    imports = [
        n
        for n in src.tree().body
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pithtrain")
    ]
    if not imports:
        raise Anchor("no top-level `from pithtrain... import`")
    src.insert(imports[-1].end_lineno, IMPORT)
    compile(src.text, "deepseek_v2.py", "exec")


if __name__ == "__main__":
    sys.exit(main(edit, "moba", "MoBA attention added (model.moba_block_size, model.moba_topk)"))
