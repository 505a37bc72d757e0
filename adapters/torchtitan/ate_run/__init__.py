"""ATE-Bench standard run spec for TorchTitan: launch script, DeepSeek-V2-Lite-shaped configs, data (README.md)."""
