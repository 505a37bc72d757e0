"""Mixture of Block Attention (MoBA; Lu et al. 2025): causal attention over a few key blocks per query.

Keys are cut into blocks of `block_size` positions (block b holds positions [b * block_size, (b + 1) *
block_size), the last one possibly shorter). Query t, in block b(t) = t // block_size, scores every earlier
block j < b(t) by its gate g(t, j) = q_t . mean(k over block j), keeps its own block plus the topk - 1
earlier blocks of highest gate, never a later one, and attends causally over the kept keys:

    out_t = softmax(scale * q_t K^T + M_t) V,   M_t[u] = 0 if u <= t and block(u) is kept, else -inf

The selection is discrete: no gradient flows through the gate. topk >= the number of blocks gives full
causal attention, topk = 1 attention inside the own block only. This is the PyTorch reference: a dense
[S, S] mask per head for F.scaled_dot_product_attention, so memory grows as S^2 like eager attention.
"""

import torch
import torch.nn.functional as F


def moba_mask(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """q, k [B, H, S, d] -> bool [B, H, S, S]: True where query t may attend to key u."""
    seq, dev = q.shape[-2], q.device
    blocks = -(-seq // block_size)
    pos, ids = torch.arange(seq, device=dev), torch.arange(blocks, device=dev)
    block = pos // block_size
    sizes = (seq - ids * block_size).clamp(max=block_size)  # the last block may be short
    k_blocks = F.pad(k.detach(), (0, 0, 0, blocks * block_size - seq)).unflatten(-2, (blocks, block_size))
    gate = q.detach() @ (k_blocks.sum(-2) / sizes[:, None].to(k.dtype)).transpose(-1, -2)  # [B, H, S, blocks]
    past, own = ids < block[:, None], ids == block[:, None]  # [S, blocks]
    gate = gate.masked_fill(~past, float("-inf")).masked_fill(own, float("inf"))
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(
        -1, gate.topk(min(topk, blocks), -1).indices, True
    )
    chosen &= past | own  # topk beyond the earlier blocks picks -inf (later) ones: drop them
    return chosen.gather(-1, block.expand(*gate.shape[:-1], seq)) & (pos <= pos[:, None])


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q, k [B, H, S, d], v [B, H, S, d_v] -> [B, H, S, d_v]: MoBA over blocks of `block_size` keys."""
    mask = moba_mask(q, k, block_size, topk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
