"""Config loading: unknown keys, wrong types and impossible shapes are one-line errors naming the key."""

import pytest
from conftest import CONFIGS, run_module

from pithtrain.config import ConfigError, load_config, parse_override


def test_tiny_configs_load():
    for name in ("tiny-deepseek-v2-lite", "tiny-qwen3-moe", "small-deepseek-v2-lite", "small-qwen3-moe",
                 "deepseek-v2-lite", "qwen3-30b-a3b", "small-qwen3-moe-ep2"):
        cfg = load_config(CONFIGS / f"{name}.toml")
        assert cfg.train.run_dir == f"runs/{name}"


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny-qwen3-moe.toml", ["train.steps=7", "model.router.top_k=3", "optim.lr=1",
                                                         "train.run_dir=/tmp/x y"])
    assert cfg.train.steps == 7 and cfg.model.router.top_k == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.run_dir == "/tmp/x y"
    assert parse_override("a.b=true") == (["a", "b"], True)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stpes=3", "train.stpes"),
        ("train.steps='ten'", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("model.router.top_k=99", "model.router.top_k"),
        ("model.router.score_func='relu'", "model.router.score_func"),
        ("optim.schedule='linear'", "optim.schedule"),
        ("model.family='llama'", "model.family"),
        ("model.router.n_group=3", "model.router.n_group"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny-qwen3-moe.toml", [override])


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    r = run_module("pithtrain.train", "--config", str(CONFIGS / "tiny-qwen3-moe.toml"),
                   "--set", f"train.run_dir={run_dir}", "--set", "model.hidden_sise=32")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.hidden_sise" in r.stderr
    assert not run_dir.exists()
    r = run_module("pithtrain.train", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr
