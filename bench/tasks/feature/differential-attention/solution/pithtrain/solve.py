"""Oracle edit for feature/differential-attention: add `model.diff_attention` to PithTrain's DeepSeek-V2.

    python solve.py pithtrain/models/deepseek_v2.py

Finds its places with `ast` (not line numbers or diff context), so it survives unrelated edits to the
file; any place it cannot find exactly once stops it with exit status 1 and the file untouched.
"""

import ast
import sys

from ast_edit import Anchor, Source, calls, main, method, one, top

NEW_CODE = '''

def diff_lambda_init(layer_idx: int) -> float:
    """lambda_init of the layer with 0-based index `layer_idx`: 0.8 - 0.6 * exp(-0.3 * layer_idx)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffAttention(Attention):
    """Differential attention (Ye et al. 2024, "Differential Transformer") on MLA's queries, keys and values.

    Heads pair up: differential head j takes heads 2j and 2j+1 as its two components (q1, k1), (q2, k2)
    [qk_head_dim each] and their values side by side as v [2 * v_head_dim]. With s the model's softmax scale:

        out_j = (softmax(s q1 k1^T + causal) - lam * softmax(s q2 k2^T + causal)) v
        lam = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
        out_j <- (1 - lambda_init) * head_norm(out_j)     (RMSNorm over the 2 * v_head_dim features)

    The lambda vectors [qk_head_dim] are shared by the layer's heads. Projections keep their shapes: out_j
    fills o_proj's inputs of heads 2j and 2j+1.
    """

    def __init__(self, cfg: DeepseekV2Config, layer_idx: int):
        super().__init__(cfg)
        self.lambda_init = diff_lambda_init(layer_idx)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.zeros(cfg.qk_head_dim)) for _ in range(4)
        )
        self.head_norm = RMSNorm(2 * cfg.v_head_dim, cfg.rms_norm_eps)

    @torch.no_grad()
    def reset_lambdas(self) -> None:
        """N(0, 0.1) per entry: with all four vectors zero their gradients would be zero too."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k [B, heads, S, qk_head_dim], v [B, heads, S, v_head_dim] -> [B, heads / 2, S, 2 * v_head_dim]."""
        lam = (
            torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
            - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
            + self.lambda_init
        )
        v = v.unflatten(1, (-1, 2)).transpose(2, 3).flatten(-2)  # values of heads 2j, 2j+1 side by side
        first, second = super().attend(q[:, 0::2], k[:, 0::2], v), super().attend(q[:, 1::2], k[:, 1::2], v)
        return self.head_norm(first - lam.to(first.dtype) * second) * (1 - self.lambda_init)
'''

CONFIG_FIELD = (
    "    diff_attention: bool = False  # differential attention in every layer (DiffAttention); even heads\n"
)
VALIDATE = """\
        if self.diff_attention and self.num_attention_heads % 2:
            raise ValueError(
                "model.diff_attention needs an even model.num_attention_heads (heads pair up), "
                f"got {self.num_attention_heads}"
            )
"""
INIT_LAMBDAS = """\
        for module in self.modules():
            if isinstance(module, DiffAttention):
                module.reset_lambdas()
"""
NO_EXPORT = """\
    if cfg.diff_attention:
        raise ValueError(
            "model.diff_attention cannot be exported: Hugging Face DeepSeek-V2 has no differential attention"
        )
"""


def edit(src: Source) -> None:
    # 1. the config key and its check
    cfg_cls = top(src.tree(), ast.ClassDef, "DeepseekV2Config")
    last_field = [n for n in cfg_cls.body if isinstance(n, ast.AnnAssign)][-1]
    src.insert(last_field.end_lineno, CONFIG_FIELD)
    validate = method(top(src.tree(), ast.ClassDef, "DeepseekV2Config"), "validate")
    src.insert(validate.end_lineno, VALIDATE)

    # 2. Attention.forward's attention call -> self.attend(q, k, v), a method DiffAttention overrides
    attn = top(src.tree(), ast.ClassDef, "Attention")
    call = one(
        calls(method(attn, "forward"), "scaled_dot_product_attention"), "attention call in Attention.forward"
    )
    stmt = one(
        [s for s in ast.walk(method(attn, "forward")) if isinstance(s, ast.Assign) and s.value is call],
        "assignment of the attention call",
    )
    if len(call.args) != 3:
        raise Anchor("the attention call should take q, k, v positionally")
    indent = src.lines[stmt.lineno - 1][: stmt.col_offset]
    target = src.segment(stmt.targets[0])
    q, k, v = (src.segment(a) for a in call.args)
    kwargs = "".join(f", {src.segment(kw)}" for kw in call.keywords)
    fn = src.segment(call.func)
    attend = (
        "\n    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:\n"
        '        """Causal attention of q, k [B, heads, S, qk_head_dim] over v [B, heads, S, v_head_dim]."""\n'
        f"        return {fn}(q, k, v{kwargs})\n"
    )
    src.insert(attn.end_lineno, attend + NEW_CODE)
    src.replace(stmt.lineno, stmt.end_lineno, f"{indent}{target} = self.attend({q}, {k}, {v})\n")

    # 3. decoder layers build DiffAttention when the key is on
    layer = top(src.tree(), ast.ClassDef, "DecoderLayer")
    make = one(calls(method(layer, "__init__"), "Attention"), "Attention(...) in DecoderLayer.__init__")
    if make.lineno != make.end_lineno:
        raise Anchor("Attention(...) in DecoderLayer.__init__ should fit one line")
    line = src.lines[make.lineno - 1]
    old = line[make.col_offset : make.end_col_offset]
    src.replace(
        make.lineno,
        make.lineno,
        line.replace(old, f"DiffAttention(cfg, layer_idx) if cfg.diff_attention else {old}", 1),
    )

    # 4. init_weights draws the lambda vectors; 5. export refuses the key
    init = method(top(src.tree(), ast.ClassDef, "DeepseekV2"), "init_weights")
    src.insert(init.end_lineno, INIT_LAMBDAS)
    to_hf = top(src.tree(), ast.FunctionDef, "config_to_hf")
    first = to_hf.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    src.insert(first.end_lineno if has_doc else to_hf.body[0].lineno - 1, NO_EXPORT)
    compile(src.text, "deepseek_v2.py", "exec")


if __name__ == "__main__":
    sys.exit(main(edit, "diff_attention", "differential attention added (model.diff_attention)"))
