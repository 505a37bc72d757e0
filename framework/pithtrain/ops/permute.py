"""Token permute / unpermute: group token copies by expert, and sum them back with gate weights.

Each token is routed to k experts, so permute makes T*k rows sorted by expert id (stable, so
ties keep token order and results are deterministic); unpermute scatters expert outputs back
to their tokens and combines them weighted by the gate.
"""

import torch


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """x [T, H], expert_ids [T, k] -> (x_sorted [T*k, H], order [T*k], counts [E] int64).

    `order[i]` is the flat (token*k + slot) index of sorted row i.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    token_of_row = order // expert_ids.shape[1]
    return x[token_of_row], order, counts


def unpermute(y_sorted: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [T*k, H] in expert order, gate_weights [T, k] -> [T, H] = sum_k w[t,k] * y[t,k]."""
    num_tokens, top_k = gate_weights.shape
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    y = y.view(num_tokens, top_k, y.shape[-1])
    return torch.einsum("tkh,tk->th", y, gate_weights.to(y.dtype))


def unpermute_reference(y_sorted, order, gate_weights):
    """Loop form of `unpermute`, used by tests to pin its meaning."""
    num_tokens, top_k = gate_weights.shape
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    for row, flat in enumerate(order.tolist()):
        t, s = divmod(flat, top_k)
        out[t] += gate_weights[t, s].to(y_sorted.dtype) * y_sorted[row]
    return out
