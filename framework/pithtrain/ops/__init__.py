"""Operators: each fast path sits beside a plain PyTorch reference that defines its meaning."""
