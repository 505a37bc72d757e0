"""ATE-Bench's thin launch entry for Megatron-Core (the wheel has no pretrain_gpt.py): see README.md beside this."""
