"""TorchTitan 0.2.2 side of the single-GPU throughput comparison (`python -m adapters.torchtitan.throughput`)."""
