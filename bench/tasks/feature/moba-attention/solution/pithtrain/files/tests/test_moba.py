"""MoBA (ops/moba.py and model.moba_block_size): the mask against a per-query loop, its limiting cases, the model."""

import pytest
import torch
import torch.nn.functional as F

from pithtrain.config import ConfigError, load_config
from pithtrain.models.deepseek_v2 import DeepseekV2
from pithtrain.ops.moba import moba_attention, moba_mask


def loop_mask(q, k, block_size, topk):
    """The definition, one query at a time."""
    batch, heads, seq, _ = q.shape
    mask = torch.zeros(batch, heads, seq, seq, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for t in range(seq):
                own = t // block_size
                gate = [
                    q[b, h, t] @ k[b, h, j * block_size : (j + 1) * block_size].mean(0) for j in range(own)
                ]
                best = sorted(range(own), key=lambda j: -gate[j])[: topk - 1]
                for j in [*best, own]:
                    mask[b, h, t, j * block_size : min((j + 1) * block_size, t + 1)] = True
    return mask


@pytest.mark.parametrize("seq,block_size,topk", [(23, 4, 2), (24, 4, 3), (17, 5, 1), (9, 2, 9)])
def test_mask_matches_the_definition(seq, block_size, topk):
    q, k = torch.randn(2, 3, seq, 8), torch.randn(2, 3, seq, 8)
    assert torch.equal(moba_mask(q, k, block_size, topk), loop_mask(q, k, block_size, topk))


def test_limits_are_causal_and_block_diagonal():
    q, k, v = torch.randn(3, 1, 2, 20, 8).unbind(0)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(moba_attention(q, k, v, 4, 5), causal)  # topk = number of blocks
    torch.testing.assert_close(moba_attention(q, k, v, 32, 1), causal)  # one block
    own = torch.arange(20)[:, None] // 4 == torch.arange(20) // 4
    local = F.scaled_dot_product_attention(
        q, k, v, attn_mask=own & torch.ones(20, 20, dtype=torch.bool).tril()
    )
    torch.testing.assert_close(moba_attention(q, k, v, 4, 1), local)


def test_model_trains_and_keys_are_checked():
    cfg = load_config("configs/tiny-deepseek-v2-lite.toml", ["model.moba_block_size=8", "model.moba_topk=2"])
    model = DeepseekV2(cfg.model)
    model.init_weights()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 30))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.layers["0"].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
    for key, value in (("moba_block_size", -1), ("moba_topk", 0)):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            load_config("configs/tiny-deepseek-v2-lite.toml", [f"model.{key}={value}"])
