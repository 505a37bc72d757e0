"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): config, model, FLOPs and Hugging Face conversion.

Module names mirror the Hugging Face checkpoints (which put everything but `lm_head` under `model.`),
so converting a state dict is a prefix change plus regrouping the routed experts.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from pithtrain.models.blocks import (
    CausalLMOutput,
    MoE,
    RMSNorm,
    RouterConfig,
    SwiGLUMLP,
    decoder_forward,
    experts_from_hf,
    experts_to_hf,
    init_weights,
)


@dataclass
class Qwen3MoeConfig:
    """The `[model]` config table; defaults are the released Qwen3-30B-A3B."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense MLP width, used by mlp_only_layers
    moe_intermediate_size: int = 768  # width of each routed expert
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    init_std: float = 0.02
    router: RouterConfig = field(default_factory=lambda: RouterConfig(num_experts=128, top_k=8))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0

    def validate(self) -> None:
        """Raise ValueError naming the offending `model.<key>`."""
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "decoder_sparse_step",
        ):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("rms_norm_eps", "rope_theta", "init_std"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"model.mlp_only_layers entries must be in [0, {self.num_hidden_layers}), got {bad}"
            )
        self.router.validate()


# ---- model ----


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim] for positions 0..S-1. Recomputed in fp32 on every call rather than kept in a
    buffer, so casting the model to bf16 or materialising it from the meta device cannot corrupt them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dims (j, j + head_dim/2) of every head, the pairing the Hugging Face checkpoints were trained with."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention; q and k get a per-head RMSNorm before RoPE (Qwen3's QK-norm)."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.grouped = cfg.num_key_value_heads != cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads = (batch, seq, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(heads)).transpose(1, 2)  # [B, heads, S, D]
        k = self.k_norm(self.k_proj(x).view(heads)).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.grouped)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block. Returns (hidden, router output or None) so that a checkpointed layer hands its
    routing statistics back instead of stashing them."""

    def __init__(self, cfg: Qwen3MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.router)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        with record_function("pithtrain.attention"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, route = self.mlp(h)
            return x + y, route
        with record_function("pithtrain.mlp"):
            return x + self.mlp(h), None


class Qwen3Moe(nn.Module):
    activation_checkpointing: bool = False  # recompute each decoder layer in backward

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        init_weights(self, self.cfg.init_std)

    def rope(self, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device, dtype)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True
    ) -> CausalLMOutput:
        """input_ids [B, S]; labels [B, S] already shifted (labels[:, t] is the token after input_ids[:, t]),
        -100 ignored. Positions are 0..S-1 in every row."""
        return decoder_forward(self, input_ids, labels, return_logits)


def flops_per_token(cfg: Qwen3MoeConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), TorchTitan's convention:

        6 * N_active + 6 * num_layers * seq_len * num_heads * 2 * head_dim

    N_active counts the matmul weights one token touches: attention projections, dense MLPs, the router,
    top_k routed experts and lm_head (embeddings and norms excluded). The second term is QK^T and AV over
    the full sequence, not halved for causality.
    """
    hidden, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    attention = 2 * hidden * head_dim * (heads + cfg.num_key_value_heads)  # q and o, k and v
    moe = hidden * cfg.router.num_experts + cfg.router.top_k * 3 * hidden * cfg.moe_intermediate_size
    dense = 3 * hidden * cfg.intermediate_size
    active = hidden * cfg.vocab_size
    for i in range(cfg.num_hidden_layers):
        active += attention + (moe if cfg.is_moe_layer(i) else dense)
    return float(6 * active + 6 * cfg.num_hidden_layers * seq_len * heads * 2 * head_dim)


# ---- Hugging Face conversion ----


def config_from_hf(hf: dict) -> Qwen3MoeConfig:
    """A transformers config.json dict -> our config. Missing keys take transformers' defaults (which differ
    from ours, e.g. norm_topk_prob=False). Training-only knobs (balance and z-loss) are not read."""
    if hf.get("model_type", "qwen3_moe") != "qwen3_moe":
        raise ValueError(f"model_type must be 'qwen3_moe', got {hf['model_type']!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    found = {
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "hidden_act": hf.get("hidden_act", "silu"),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "use_sliding_window": bool(hf.get("use_sliding_window", False)),
    }
    supported = {
        "rope_type": "default",
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
    }
    for key, value in found.items():
        if value != supported[key]:
            raise ValueError(
                f"Hugging Face config {key}={value!r} is not supported (only {supported[key]!r})"
            )
    top_k, norm_topk_prob = hf.get("num_experts_per_tok", 8), hf.get("norm_topk_prob", False)
    hidden, heads = hf.get("hidden_size", 2048), hf.get("num_attention_heads", 32)
    return Qwen3MoeConfig(
        vocab_size=hf.get("vocab_size", 151936),
        hidden_size=hidden,
        intermediate_size=hf.get("intermediate_size", 6144),
        moe_intermediate_size=hf.get("moe_intermediate_size", 768),
        num_hidden_layers=hf.get("num_hidden_layers", 24),
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1),
        mlp_only_layers=list(hf.get("mlp_only_layers") or []),
        init_std=hf.get("initializer_range", 0.02),
        router=RouterConfig(
            # transformers' to_dict() writes num_experts as num_local_experts
            num_experts=hf.get("num_experts", hf.get("num_local_experts", 128)),
            top_k=top_k,
            norm_topk_prob=norm_topk_prob,
        ),
    )


def config_to_hf(cfg: Qwen3MoeConfig) -> dict:
    """Our config -> a config.json dict transformers loads as Qwen3MoeForCausalLM. Raises ValueError
    for routing that transformers' Qwen3-MoE cannot express, since the export would compute something else."""
    r = cfg.router
    inexpressible = {
        "score_func": r.score_func != "softmax",
        "expert_bias": r.expert_bias,
        "n_group": r.n_group != 1,
        "routed_scaling_factor": r.routed_scaling_factor != 1.0,
    }
    for key, bad in inexpressible.items():
        if bad:
            raise ValueError(
                f"model.router.{key}={getattr(r, key)!r} cannot be exported to Hugging Face Qwen3-MoE"
            )
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # the transformers-4 spelling, for readers that predate rope_parameters
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "mlp_only_layers": list(cfg.mlp_only_layers),
        "num_experts": r.num_experts,
        "num_experts_per_tok": r.top_k,
        # blocks.Router leaves a single expert's weight unnormalised; transformers would set it to 1.
        "norm_topk_prob": r.norm_topk_prob,
        "router_aux_loss_coef": r.lb_loss_coef,
        "output_router_logits": False,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
    }


def state_dict_from_hf(sd: dict, cfg: Qwen3MoeConfig) -> dict:
    """Hugging Face weights (per-expert or transformers-5 fused experts) -> our state dict.
    Raises KeyError naming the first missing key, or the keys left unused."""
    src = {
        k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")
    }  # old checkpoints carry these

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"missing {key!r} in the Hugging Face checkpoint")
        return src.pop(key)

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    dense = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    for i in range(cfg.num_hidden_layers):
        names = [
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
            "self_attn.k_norm.weight", *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        ]  # fmt: skip
        names += ["mlp.gate.weight"] if cfg.is_moe_layer(i) else dense
        for name in names:
            out[f"layers.{i}.{name}"] = take(f"model.layers.{i}.{name}")
        if cfg.is_moe_layer(i):
            w_gate_up, w_down = experts_from_hf(src, f"model.layers.{i}.mlp.experts", cfg.router.num_experts)
            out[f"layers.{i}.mlp.experts.w_gate_up"], out[f"layers.{i}.mlp.experts.w_down"] = (
                w_gate_up,
                w_down,
            )
    if cfg.tie_word_embeddings:
        src.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if src:
        raise KeyError(f"unexpected keys in the Hugging Face checkpoint: {sorted(src)[:8]}")
    return out


def state_dict_to_hf(sd: dict, cfg: Qwen3MoeConfig) -> dict:
    """Our state dict -> the released Hugging Face layout (per-expert weights; lm_head dropped when tied)."""
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[key] = value
        elif key.endswith(".mlp.experts.w_gate_up"):
            layer = key.removesuffix(".mlp.experts.w_gate_up")
            out.update(experts_to_hf(f"model.{layer}.mlp.experts", value, sd[f"{layer}.mlp.experts.w_down"]))
        elif not key.endswith(".mlp.experts.w_down"):
            out[f"model.{key}"] = value
    return out
