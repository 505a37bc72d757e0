"""Qwen3-MoE: logits parity with transformers both ways, loss/backward sanity, config validation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pithtrain.models import qwen3_moe
from pithtrain.models.blocks import RouterConfig
from pithtrain.models.qwen3_moe import Qwen3Moe, Qwen3MoeConfig

VOCAB = 256


def tiny_config(**overrides) -> Qwen3MoeConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        router=RouterConfig(num_experts=8, top_k=2),
    )
    return Qwen3MoeConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that logits are O(1) and norms away from 1, so any mix-up shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "norm_topk_prob, mlp_only_layers, decoder_sparse_step, tie",
    [(True, [1], 1, False), (False, [], 1, True), (True, [], 2, False)],
)
def test_logits_match_transformers(norm_topk_prob, mlp_only_layers, decoder_sparse_step, tie):
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=mlp_only_layers,
        decoder_sparse_step=decoder_sparse_step,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
    randomize(hf)
    cfg = qwen3_moe.config_from_hf(hf_cfg.to_dict())
    assert cfg.router.num_experts == 8 and cfg.router.norm_topk_prob == norm_topk_prob
    ours = Qwen3Moe(cfg).eval()
    ours.load_state_dict(qwen3_moe.state_dict_from_hf(hf.state_dict(), cfg))  # transformers-5 fused experts
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie

    x = tokens()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
    assert expected.abs().max() > 1  # the comparison means something
    assert max_diff(expected, got) < 1e-5


def test_export_loads_in_transformers(tmp_path):
    cfg = tiny_config(mlp_only_layers=[0])
    model = Qwen3Moe(cfg).eval()
    randomize(model)
    hf_sd = qwen3_moe.state_dict_to_hf(model.state_dict(), cfg)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hf_sd  # the released per-expert layout
    save_file(hf_sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(qwen3_moe.config_to_hf(cfg)))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        assert max_diff(hf(x).logits, model(x).logits) < 1e-5
    # And back: the per-expert layout converts to exactly our weights, config included.
    assert qwen3_moe.config_from_hf(qwen3_moe.config_to_hf(cfg)) == dataclasses.replace(
        cfg, router=RouterConfig(num_experts=8, top_k=2)
    )
    back = qwen3_moe.state_dict_from_hf(hf_sd, cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_state_dict_from_hf_names_bad_keys():
    cfg = tiny_config(tie_word_embeddings=True)
    hf_sd = qwen3_moe.state_dict_to_hf(Qwen3Moe(cfg).state_dict(), cfg)
    assert "lm_head.weight" not in hf_sd
    missing = dict(hf_sd)
    del missing["model.layers.2.self_attn.k_norm.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight"):
        qwen3_moe.state_dict_from_hf(missing, cfg)
    extra = {**hf_sd, "model.layers.0.mlp.shared_expert.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.shared_expert\.weight"):
        qwen3_moe.state_dict_from_hf(extra, cfg)


@pytest.mark.parametrize(
    "router_change, key",
    [
        (dict(score_func="sigmoid"), "score_func"),
        (dict(expert_bias=True), "expert_bias"),
        (dict(n_group=2, topk_group=1), "n_group"),
        (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    ],
)
def test_config_to_hf_rejects_routing_transformers_cannot_run(router_change, key):
    cfg = tiny_config(router=RouterConfig(num_experts=8, top_k=2, **router_change))
    with pytest.raises(ValueError, match=rf"model\.router\.{key}"):
        qwen3_moe.config_to_hf(cfg)


# config.json of the released Qwen/Qwen3-30B-A3B (transformers-4 spelling of RoPE).
RELEASED_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_defaults_are_the_released_30b_a3b():
    assert qwen3_moe.config_from_hf(RELEASED_30B_A3B) == Qwen3MoeConfig()
    exported = qwen3_moe.config_to_hf(Qwen3MoeConfig())
    shared = (exported.keys() & RELEASED_30B_A3B.keys()) - {"router_aux_loss_coef"}  # a training choice
    assert {k: exported[k] for k in shared} == {k: RELEASED_30B_A3B[k] for k in shared}
    loaded = transformers.Qwen3MoeConfig(**exported)
    assert (
        loaded.rope_parameters["rope_theta"] == 1e6 and loaded.num_experts == 128 and loaded.head_dim == 128
    )
    yarn = {**RELEASED_30B_A3B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        qwen3_moe.config_from_hf(yarn)


def loss_and_grads(model: Qwen3Moe, x: torch.Tensor, labels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels)
    (out.loss + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_backward_and_activation_checkpointing():
    router = RouterConfig(num_experts=8, top_k=2, lb_loss_coef=0.01, z_loss_coef=0.001)
    cfg = tiny_config(router=router, mlp_only_layers=[1])
    torch.manual_seed(0)
    model = Qwen3Moe(cfg)
    model.init_weights()
    x = tokens(seq=32)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100

    out, grads = loss_and_grads(model, x, labels)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(VOCAB)).item()) < 0.5
    assert out.lb_loss > 0 and out.z_loss > 0
    assert out.expert_load.shape == (2, 8) and out.expert_load.sum() == 2 * x.numel() * 2  # 2 MoE layers
    for name, _ in model.named_parameters():
        assert name in grads and grads[name].abs().sum() > 0, f"no gradient reaches {name}"

    model.activation_checkpointing = True
    out_ckpt, grads_ckpt = loss_and_grads(model, x, labels)
    assert torch.equal(out.loss, out_ckpt.loss) and torch.equal(out.aux_loss, out_ckpt.aux_loss)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6, rtol=1e-5), name

    assert model(x, return_logits=False).logits is None


def test_flops_per_token_counts_active_parameters():
    cfg = tiny_config(mlp_only_layers=[2])
    model = Qwen3Moe(cfg)
    share = cfg.router.top_k / cfg.router.num_experts
    active = sum(
        p.numel() * (share if ".experts." in name else 1)
        for name, p in model.named_parameters()
        if p.dim() > 1 and name != "embed_tokens.weight"
    )
    seq = 128
    attention = 6 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * 2 * cfg.head_dim
    assert qwen3_moe.flops_per_token(cfg, seq) == pytest.approx(6 * active + attention)
    # The released Qwen3-30B-A3B activates about 3.3B parameters per token.
    assert 3.0e9 < (qwen3_moe.flops_per_token(Qwen3MoeConfig(), 0) / 6) < 3.6e9


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(num_key_value_heads=3), "model.num_key_value_heads"),
        (dict(head_dim=15), "model.head_dim"),
        (dict(mlp_only_layers=[3]), "model.mlp_only_layers"),
        (dict(decoder_sparse_step=0), "model.decoder_sparse_step"),
        (dict(router=RouterConfig(num_experts=8, top_k=9)), "model.router.top_k"),
    ],
)
def test_validate_names_the_bad_key(change, key):
    cfg = tiny_config(**change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Qwen3Moe(cfg)
