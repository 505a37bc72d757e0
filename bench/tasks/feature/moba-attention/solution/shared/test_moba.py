"""MoBA (the operator moba.py): the mask against a per-query loop, and its limiting cases.

The oracles copy this file into each framework's tests/ with `from moba import` rewritten to the operator's module
there; here, beside ../shared/moba.py, it runs as it is.
"""

import pytest
import torch
import torch.nn.functional as F
from moba import moba_attention, moba_mask


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
