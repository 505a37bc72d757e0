"""DeepSeek-V2 / DeepSeek-V2-Lite: multi-head latent attention (MLA) + DeepSeekMoE, in one file.

Module names mirror the Hugging Face checkpoints (everything but `lm_head` lives under `model.`
there), so conversion is a prefix change plus the expert-bank layout. The forward reproduces
transformers' `DeepseekV2ForCausalLM` (interleaved-pair RoPE, YaRN scaling, greedy or
group-limited-greedy routing); the conversion helpers at the bottom go both ways.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from pithtrain.models import blocks
from pithtrain.models.blocks import MoE, RMSNorm, RouterConfig, SwiGLUMLP


@dataclass
class DeepseekV2Config:
    """The `[model]` config table; defaults are the released DeepSeek-V2-Lite."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 1408  # per expert (shared experts: n_shared_experts times this)
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int = 0  # 0: queries straight from q_proj (V2-Lite); > 0: low-rank q_a_proj -> q_b_proj
    kv_lora_rank: int = 512  # width of the compressed key/value latent
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # decoupled RoPE part of each head; the key part is shared by all heads
    v_head_dim: int = 128
    first_k_dense_replace: int = 1  # this many leading layers use a dense MLP instead of MoE
    n_shared_experts: int = 2
    router: RouterConfig = field(
        default_factory=lambda: RouterConfig(num_experts=64, top_k=6, norm_topk_prob=False)
    )
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_type: str = "yarn"  # "yarn" | "none"
    rope_factor: float = 40.0  # YaRN fields below are read only when rope_scaling_type == "yarn"
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707
    mscale_all_dim: float = 0.707
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    init_std: float = 0.02

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        """Raise ValueError naming the offending `model.<key>`."""
        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads kv_lora_rank qk_rope_head_dim v_head_dim max_position_embeddings "
            "rms_norm_eps rope_theta init_std"
        ).split()
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        for key in ("q_lora_rank", "qk_nope_head_dim", "n_shared_experts"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"model.first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}"
            )
        if self.rope_scaling_type not in ("yarn", "none"):
            raise ValueError(
                f"model.rope_scaling_type must be 'yarn' or 'none', got {self.rope_scaling_type!r}"
            )
        if self.rope_scaling_type == "yarn":
            for key in ("rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"model.{key} must be > 0 with YaRN rope, got {getattr(self, key)}")
        self.router.validate()


# ---- Rotary embedding (YaRN) ----


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg: DeepseekV2Config) -> tuple[torch.Tensor, float]:
    """-> (inverse frequencies [rope_dim / 2], factor that multiplies cos and sin).

    YaRN keeps the fast-rotating pairs (more than beta_fast turns over the original context)
    as they are, divides the slow ones (fewer than beta_slow turns) by rope_factor, and blends
    linearly between, with the band edges rounded outwards as transformers and DeepSeek do.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    wavelength_scale = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / wavelength_scale
    if cfg.rope_scaling_type == "none":
        return inv_freq, 1.0
    factor = cfg.rope_factor

    def pair_index_with(turns: float) -> float:
        wavelengths = cfg.original_max_position_embeddings / (turns * 2 * math.pi)
        return dim * math.log(wavelengths) / (2 * math.log(base))

    low = max(math.floor(pair_index_with(cfg.beta_fast)), 0)
    high = min(math.ceil(pair_index_with(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    interpolate = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - interpolate) + 1.0 / (factor * wavelength_scale) * interpolate
    if cfg.mscale and cfg.mscale_all_dim:
        attention_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor, 1.0)
    return inv_freq, attention_factor


def softmax_scale(cfg: DeepseekV2Config) -> float:
    """1/sqrt(qk_head_dim), times mscale_all_dim's correction squared under YaRN (as the released model)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_scaling_type == "yarn" and cfg.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    return scale


def rope_tables(cfg: DeepseekV2Config, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, rope_dim / 2] in fp32; recomputed per call (cheap) so no buffer can be
    cast to bf16 or left unset on a meta-initialised model."""
    inv_freq, attention_factor = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq.to(device))
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, S, heads, d]: the layout DeepSeek's weights expect."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


# ---- Layers ----


class Attention(nn.Module):
    """Multi-head latent attention: keys and values are expanded from a small shared latent;
    a separate RoPE key part (one for all heads) carries position."""

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        self.cfg = cfg
        heads = cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.scale = softmax_scale(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        batch, seq, _ = x.shape
        heads, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(batch, seq, heads, cfg.qk_head_dim).split([nope, rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(batch, seq, heads, nope + cfg.v_head_dim)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).expand(-1, -1, heads, -1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * cfg.v_head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense_replace
        if self.is_moe:
            self.mlp = MoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.router,
                num_shared_experts=cfg.n_shared_experts,
            )
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> (hidden, RouterOutput or None); only tensors out, so checkpointing can recompute it."""
        with record_function("pithtrain.attention"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, route = self.mlp(h)
            return x + y, route
        with record_function("pithtrain.mlp"):
            return x + self.mlp(h), None


class DeepseekV2(nn.Module):
    activation_checkpointing: bool = False  # recompute each decoder layer in backward

    def __init__(self, cfg: DeepseekV2Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        blocks.init_weights(self, self.cfg.init_std)

    def rope(self, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.cfg, seq_len, device)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, return_logits: bool = True
    ):
        """input_ids [B, S]; labels [B, S] already shifted (-100 ignored) -> blocks.CausalLMOutput."""
        return blocks.decoder_forward(self, input_ids, labels, return_logits)


def flops_per_token(cfg: DeepseekV2Config, seq_len: int) -> float:
    """Training FLOPs per token = 6 * N_active + 6 * L * S * heads * (qk_head_dim + v_head_dim).

    N_active counts the matmul weights one token passes through: attention projections, dense
    MLPs, router, top_k routed experts + shared experts, lm_head (embeddings excluded). The second
    term is QK^T and PV over the full S x S square (not halved for causality; TorchTitan's convention).
    """
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = h * heads * cfg.qk_head_dim
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attention = q + kv_a + kv_b + heads * cfg.v_head_dim * h
    dense = 3 * h * cfg.intermediate_size
    experts = cfg.router.top_k + cfg.n_shared_experts
    moe = h * cfg.router.num_experts + experts * 3 * h * cfg.moe_intermediate_size
    num_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    lm_head = h * cfg.vocab_size
    active = cfg.num_hidden_layers * attention + cfg.first_k_dense_replace * dense + num_moe * moe + lm_head
    scores = cfg.num_hidden_layers * seq_len * heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return float(6 * active + 6 * scores)


# ---- Hugging Face conversion ----


def config_from_hf(hf: dict) -> DeepseekV2Config:
    """A Hugging Face config.json (released `rope_scaling` or transformers-5 `rope_parameters`) -> ours.

    transformers ignores `norm_topk_prob` for DeepSeek-V2 (the released models set it false), so
    it is imported as False to reproduce transformers' forward. Balance-loss settings stay at our
    defaults: they are training options, not part of the checkpoint.
    """
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope_scaling.type {rope_type!r} is not supported (only 'yarn' or none)")
    for key in ("attention_factor", "partial_rotary_factor"):
        if rope.get(key) is not None:
            raise ValueError(f"rope_scaling.{key} is not supported")
    if rope.get("truncate", True) is False:
        raise ValueError("rope_scaling.truncate=false is not supported")
    max_pos = hf.get("max_position_embeddings", 163840)
    original_max = rope.get("original_max_position_embeddings") or max_pos
    topk_method = hf.get("topk_method", "greedy")
    if topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {topk_method!r} is not supported")
    grouped = topk_method == "group_limited_greedy"  # transformers ignores n_group under "greedy"
    if hf.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"scoring_func {hf['scoring_func']!r} is not supported by DeepSeek-V2")
    num_experts = hf.get("n_routed_experts", 64)
    router = RouterConfig(
        num_experts=num_experts,
        top_k=hf.get("num_experts_per_tok") or 6,
        norm_topk_prob=False,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=(hf.get("n_group") or 1) if grouped else 1,
        topk_group=(hf.get("topk_group") or 1) if grouped else 1,
    )
    yarn = {}  # YaRN fields keep our defaults when the checkpoint has no rope scaling
    if rope_type == "yarn":
        yarn = dict(
            rope_factor=float(rope.get("factor") or max_pos / original_max),
            original_max_position_embeddings=original_max,
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0.0),  # 0 reads as "absent", as in transformers
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
    return DeepseekV2Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        n_shared_experts=hf.get("n_shared_experts") or 0,
        router=router,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling_type="yarn" if rope_type == "yarn" else "none",
        max_position_embeddings=max_pos,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        **yarn,
    )


def config_to_hf(cfg: DeepseekV2Config) -> dict:
    """Ours -> a config.json in the released layout (`rope_scaling` + `rope_theta`, which transformers
    5 converts to `rope_parameters`). Raises ValueError for router settings whose forward HF lacks."""
    cfg.validate()
    r = cfg.router
    if r.score_func != "softmax":
        raise ValueError(
            f"model.router.score_func={r.score_func!r} cannot be exported: DeepSeek-V2 uses softmax"
        )
    if r.expert_bias:
        raise ValueError("model.router.expert_bias cannot be exported: DeepSeek-V2 has no expert bias")
    if r.norm_topk_prob and r.top_k > 1:
        raise ValueError(
            "model.router.norm_topk_prob cannot be exported: transformers' DeepSeek-V2 ignores it"
        )
    rope_scaling = None
    if cfg.rope_scaling_type == "yarn":
        rope_scaling = {
            "type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale_all_dim,
        }
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": 1,
        "n_routed_experts": r.num_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": r.top_k,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": r.routed_scaling_factor,
        "topk_method": "group_limited_greedy" if r.n_group > 1 else "greedy",
        "n_group": r.n_group,
        "topk_group": r.topk_group,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
    }


def _expected_state(cfg: DeepseekV2Config) -> dict[str, torch.Tensor]:
    """Our state dict's keys and shapes, from a weightless (meta) model."""
    with torch.device("meta"):
        return DeepseekV2(cfg).state_dict()


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: DeepseekV2Config) -> dict[str, torch.Tensor]:
    """HF weights (per-expert released layout or transformers-5 fused experts) -> our state dict.
    Raises KeyError naming any missing or unexpected key, ValueError for a wrong shape."""
    sd = dict(sd)  # experts_from_hf pops what it reads
    out = {}
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        w_gate_up, w_down = blocks.experts_from_hf(
            sd, f"model.layers.{i}.mlp.experts", cfg.router.num_experts
        )
        out[f"layers.{i}.mlp.experts.w_gate_up"] = w_gate_up
        out[f"layers.{i}.mlp.experts.w_down"] = w_down
    hf_name = {}  # our key -> the checkpoint's, for error messages
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older exports saved this recomputable buffer
        ours = key.removeprefix("model.")
        out[ours], hf_name[ours] = value, key
    expected = _expected_state(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" not in out and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    for key, ref in expected.items():
        if key.endswith("mlp.gate.expert_bias") and key not in out:
            out[key] = torch.zeros(ref.shape)  # our aux-loss-free balancing starts from no bias
    missing = ["model." + k if k != "lm_head.weight" else k for k in expected if k not in out]
    unexpected = [hf_name.get(k, k) for k in out if k not in expected]
    if missing:
        raise KeyError(f"Hugging Face checkpoint lacks {missing[:5]} ({len(missing)} missing)")
    if unexpected:
        raise KeyError(
            f"unexpected keys in the Hugging Face checkpoint: {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for key, ref in expected.items():
        if out[key].shape != ref.shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(out[key].shape)} != model shape {tuple(ref.shape)}"
            )
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: DeepseekV2Config) -> dict[str, torch.Tensor]:
    """Our state dict -> the released per-expert HF layout (a tied lm_head is dropped, as HF saves it)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("mlp.gate.expert_bias") or key.endswith("mlp.experts.w_down"):
            continue
        if key.endswith("mlp.experts.w_gate_up"):
            prefix = key.removesuffix(".w_gate_up")
            w_down = sd[prefix + ".w_down"]
            out.update(blocks.experts_to_hf(f"model.{prefix}", value.detach(), w_down.detach()))
        elif key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[key] = value.detach()
        else:
            out["model." + key] = value.detach()
    return out
