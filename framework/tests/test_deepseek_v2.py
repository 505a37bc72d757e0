"""DeepSeek-V2: logits parity with transformers (import and export), loss/backward, config checks."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pithtrain.models import deepseek_v2 as ds
from pithtrain.models.blocks import RouterConfig

TINY_HF = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=24,  # differs from the qk head dim, as in the real model
    first_k_dense_replace=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    max_position_embeddings=2048,  # = factor * original_max_position_embeddings below
    rope_theta=10000.0,
    initializer_range=0.05,
)
YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 256,  # short, so the YaRN ramp spans several rope pairs
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale, so the cos/sin attention factor is not 1
}

CASES = {
    "lite": dict(q_lora_rank=None, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "q_lora_yarn": dict(q_lora_rank=16, rope_scaling=YARN),
    "q_lora_group_scaled": dict(
        q_lora_rank=16,
        rope_scaling=None,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,  # > topk_group, else the group limit never binds
        routed_scaling_factor=2.5,
    ),
    "no_rope_scaling_greedy_scaled": dict(q_lora_rank=None, rope_scaling=None, routed_scaling_factor=0.5),
}


def randomize_(model: torch.nn.Module) -> None:
    """Norms away from 1 and routers with clear margins, so a misplaced weight or a near-tie cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)


def hf_model(hf_cfg: dict):
    config = transformers.DeepseekV2Config(**hf_cfg)
    config._attn_implementation = "eager"
    model = transformers.DeepseekV2ForCausalLM(config).float().eval()
    randomize_(model)
    return model


def our_model(cfg: ds.DeepseekV2Config) -> ds.DeepseekV2:
    model = ds.DeepseekV2(cfg)
    model.init_weights()
    randomize_(model)
    return model


def tiny_cfg(**router_kw) -> ds.DeepseekV2Config:
    cfg = ds.config_from_hf(dict(TINY_HF, rope_scaling=YARN, q_lora_rank=16))
    return dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, **router_kw))


def tokens(batch=2, seq=24, vocab=256):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(case):
    torch.manual_seed(0)
    hf_cfg = dict(TINY_HF, **CASES[case])
    hf = hf_model(hf_cfg)
    cfg = ds.config_from_hf(hf_cfg)
    ours = ds.DeepseekV2(cfg).eval()
    ours.load_state_dict(ds.state_dict_from_hf(hf.state_dict(), cfg))
    ids = tokens()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(routed_scaling_factor=1.5, n_group=2, topk_group=1)
    ours = our_model(cfg).eval()
    save_file(ds.state_dict_to_hf(ours.state_dict(), cfg), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ds.config_to_hf(cfg)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    ids = tokens()
    with torch.no_grad():
        diff = (hf.eval()(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-5
    assert ds.config_from_hf(hf.config.to_dict()) == cfg  # transformers-5 `rope_parameters` reads back too


def test_state_dict_round_trip_and_key_errors():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    sd = our_model(cfg).state_dict()
    hf_sd = ds.state_dict_to_hf(sd, cfg)
    assert (
        "model.layers.1.mlp.experts.7.gate_proj.weight" in hf_sd and "model.layers.1.mlp.gate.weight" in hf_sd
    )
    back = ds.state_dict_from_hf(hf_sd, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.o_proj.weight"):
        ds.state_dict_from_hf({k: v for k, v in hf_sd.items() if "layers.0.self_attn.o_proj" not in k}, cfg)
    with pytest.raises(KeyError, match="model.layers.2.mlp.experts.3.gate_proj.weight"):
        ds.state_dict_from_hf(
            {k: v for k, v in hf_sd.items() if "layers.2.mlp.experts.3.gate_proj" not in k}, cfg
        )
    with pytest.raises(KeyError, match="model.extra.weight"):
        ds.state_dict_from_hf(dict(hf_sd, **{"model.extra.weight": torch.zeros(1)}), cfg)


def test_loss_backward_and_checkpointing():
    torch.manual_seed(0)
    cfg = tiny_cfg(lb_loss_coef=0.01, z_loss_coef=0.001)
    model = our_model(cfg)
    ids = tokens()
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100

    def run(checkpointing: bool):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        out = model(ids, labels=labels)
        (out.loss + out.aux_loss).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run(False)
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert out.expert_load.shape == (2, 8) and out.expert_load.sum() == 2 * ids.numel() * cfg.router.top_k
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
    for i, load in zip((1, 2), out.expert_load):  # every expert that got tokens gets a gradient
        w = grads[f"layers.{i}.mlp.experts.w_gate_up"]
        assert all(w[e].abs().sum() > 0 for e in range(8) if load[e] > 0)

    out_ckpt, grads_ckpt = run(True)
    assert torch.equal(out_ckpt.loss, out.loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-7)


def test_validate_names_the_key():
    with pytest.raises(ValueError, match=r"model\.kv_lora_rank"):
        ds.DeepseekV2Config(kv_lora_rank=0).validate()
    with pytest.raises(ValueError, match=r"model\.qk_rope_head_dim"):
        ds.DeepseekV2Config(qk_rope_head_dim=63).validate()
    with pytest.raises(ValueError, match=r"model\.first_k_dense_replace"):
        ds.DeepseekV2Config(first_k_dense_replace=28).validate()
    with pytest.raises(ValueError, match=r"model\.router\.top_k"):
        ds.DeepseekV2Config(router=RouterConfig(num_experts=4, top_k=6)).validate()
    ds.DeepseekV2Config().validate()


@pytest.mark.parametrize(
    "router_kw, key",
    [
        ({"score_func": "sigmoid"}, "score_func"),
        ({"expert_bias": True}, "expert_bias"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
    ],
)
def test_export_refuses_what_transformers_cannot_run(router_kw, key):
    with pytest.raises(ValueError, match=rf"model\.router\.{key}"):
        ds.config_to_hf(tiny_cfg(**router_kw))


def test_default_config_is_v2_lite():
    cfg = ds.DeepseekV2Config()
    hf = ds.config_to_hf(cfg)
    assert hf["q_lora_rank"] is None and hf["topk_method"] == "greedy" and hf["rope_scaling"]["factor"] == 40
    assert ds.config_from_hf(hf) == cfg
    no_yarn = dataclasses.replace(cfg, rope_scaling_type="none")
    assert (
        ds.config_to_hf(no_yarn)["rope_scaling"] is None
        and ds.config_from_hf(ds.config_to_hf(no_yarn)) == no_yarn
    )
    # ~2.4B active parameters (the released figure) -> about 6 * 2.4e9 FLOPs per token, plus attention.
    assert 6 * 2.0e9 < ds.flops_per_token(cfg, 0) < 6 * 2.6e9


def test_flops_per_token_counts_active_weights():
    cfg = tiny_cfg()
    with torch.device("meta"):
        model = ds.DeepseekV2(cfg)
    active = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed_tokens.weight":
            continue
        share = cfg.router.top_k / cfg.router.num_experts if ".mlp.experts." in name else 1.0
        active += p.numel() * share
    seq = 128
    attention = 6 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert ds.flops_per_token(cfg, seq) == pytest.approx(6 * active + attention)
