"""Differential attention (model.diff_attention): the formula on one layer, lambda_init, gradients, config checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from pithtrain.config import ConfigError, load_config
from pithtrain.models.deepseek_v2 import DeepseekV2, DiffAttention

CONFIG = "configs/tiny-deepseek-v2-lite.toml"


def test_layer_matches_the_formula():
    cfg = load_config(CONFIG, ["model.diff_attention=true"]).model
    attn = DiffAttention(cfg, layer_idx=2)
    torch.manual_seed(0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    q, k = torch.randn(2, 2, cfg.num_attention_heads, 9, cfg.qk_head_dim).unbind(0)
    v = torch.randn(2, cfg.num_attention_heads, 9, cfg.v_head_dim)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()

    def softmax(i):  # component i of every differential head: heads i, i + 2, ...
        scores = q[:, i::2] @ k[:, i::2].transpose(-1, -2) * attn.scale
        return scores.masked_fill(~causal, -math.inf).softmax(-1)

    lam0 = 0.8 - 0.6 * math.exp(-0.6)
    with torch.no_grad():
        lam = torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2) + lam0
    out = (softmax(0) - lam * softmax(1)) @ torch.cat([v[:, 0::2], v[:, 1::2]], -1)
    want = F.rms_norm(out, (out.shape[-1],), attn.head_norm.weight, cfg.rms_norm_eps) * (1 - lam0)
    assert attn.lambda_init == pytest.approx(lam0)
    with torch.no_grad():
        torch.testing.assert_close(attn.attend(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_model_trains_and_lambdas_get_gradients():
    cfg = load_config(CONFIG, ["model.diff_attention=true"]).model
    model = DeepseekV2(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for layer in model.layers.values():
        assert all(p.grad.abs().sum() > 0 for n, p in layer.self_attn.named_parameters() if "lambda" in n)


def test_odd_heads_are_rejected():
    with pytest.raises(ConfigError, match="model.diff_attention"):
        load_config(CONFIG, ["model.diff_attention=true", "model.num_attention_heads=3"])
