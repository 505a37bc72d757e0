"""Megatron-Core side of the one-GPU throughput comparison (see throughput.py and README.md)."""
