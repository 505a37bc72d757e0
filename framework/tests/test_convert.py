"""Hugging Face export/import through the CLI: a trained run loads into transformers with the same logits."""

import json

import pytest
import torch
from conftest import run_module
from test_train import tiny

from pithtrain import checkpoint as ckpt
from pithtrain.config import build_config, model_classes
from pithtrain.data import DataLoader, TokenShards, builtin_dataset
from pithtrain.train import train


def run_model(run_dir):
    cfg = build_config(json.loads((run_dir / "config.json").read_text()))
    _, model_cls = model_classes(cfg.family)
    model = model_cls(cfg.model)
    ckpt.load_model_weights(ckpt.latest_checkpoint(run_dir), model)
    return model.eval(), cfg


@pytest.mark.parametrize("name", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_export_loads_in_transformers_and_import_round_trips(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    train(tiny(run_dir, name, **{"train.steps": 2}))
    hf_dir = tmp_path / "hf"
    r = run_module("pithtrain.convert", "export", "--run-dir", str(run_dir), "--out", str(hf_dir))
    assert r.returncode == 0, r.stderr
    model, cfg = run_model(run_dir)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.decode(tok("Python code")["input_ids"]) == "Python code"
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")

    imported = tmp_path / "imported"
    r = run_module("pithtrain.convert", "import", "--hf", str(hf_dir), "--out", str(imported))
    assert r.returncode == 0, r.stderr
    assert f'family = "{cfg.family}"' in (imported / "model.toml").read_text()
    # A run started from the imported weights sees, at its first step, the source model's loss.
    start = tmp_path / "from-import"
    summary = train(tiny(start, name, **{"train.steps": 1, "checkpoint.init_from": str(imported / "weights")}))
    loader = DataLoader(TokenShards(builtin_dataset()), 32, 2, 2, seed=0)
    with torch.no_grad():
        expected = sum(model(*loader.next_batch(), return_logits=False).loss.item() for _ in range(2)) / 2
    assert summary["first_loss"] == pytest.approx(expected, rel=1e-6)


def test_convert_errors_exit_2_and_write_nothing(tmp_path):
    r = run_module("pithtrain.convert", "export", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "config.json" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    r = run_module("pithtrain.convert", "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_export_refuses_what_transformers_cannot_compute(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(run_dir, "tiny-qwen3-moe", **{"train.steps": 1, "model.router.score_func": "sigmoid"}))
    r = run_module("pithtrain.convert", "export", "--run-dir", str(run_dir), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "model.router.score_func" in r.stderr
    assert not (tmp_path / "hf").exists()
