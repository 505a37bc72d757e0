"""MoBA in PithTrain's model: model.moba_block_size / model.moba_topk train and are checked (the operator: test_moba.py)."""

import pytest
import torch

from pithtrain.config import ConfigError, load_config
from pithtrain.models.deepseek_v2 import DeepseekV2


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
