"""PithTrain: a compact Mixture-of-Experts training framework (PyTorch + Triton)."""

__version__ = "0.1.0"
