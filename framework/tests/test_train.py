"""Training on CPU: loss falls, metrics are complete, resume is bit-exact, a crashed save is never resumed."""

import json
import math

import pytest
import torch
from conftest import CONFIGS, run_module

from pithtrain import checkpoint as ckpt
from pithtrain.config import ConfigError, OptimConfig, load_config
from pithtrain.parallel.mesh import Parallel
from pithtrain.train import build_model, lr_factor, train


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["tiny-deepseek-v2-lite", "tiny-qwen3-moe"])
def test_tiny_run_learns(name, tmp_path):
    """The shipped tiny config trains end to end through the CLI with clearly falling loss."""
    run_dir = tmp_path / "run"
    r = run_module("pithtrain.train", "--config", str(CONFIGS / f"{name}.toml"), "--set", f"train.run_dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout
    rows = read_metrics(run_dir)
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert [row["step"] for row in rows] == list(range(1, cfg.train.steps + 1))
    keys = {"step", "loss", "lb_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_mem_gib",
            "load_min", "load_max", "load_cv"}
    for row in rows:
        assert keys <= row.keys()
        assert all(math.isfinite(row[k]) for k in ("loss", "lb_loss", "grad_norm", "lr", "tokens_per_s"))
        assert len(row["load_cv"]) == cfg.model.num_hidden_layers - getattr(cfg.model, "first_k_dense_replace", 0)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert first > 8.0 and last < first - 1.5, (first, last)  # ln(4096) = 8.3 at init
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_loss"] == last and math.isfinite(summary["val_loss"])
    assert ckpt.latest_checkpoint(run_dir).name == f"step_{cfg.train.steps:08d}"


def tiny(tmp_path, name="tiny-deepseek-v2-lite", **overrides):
    sets = {"train.steps": 6, "train.micro_batch_size": 2, "train.seq_len": 32, "train.grad_accum": 2,
            "train.log_every": 100, "train.eval_batches": 1, "train.run_dir": str(tmp_path)}
    sets.update(overrides)
    return load_config(CONFIGS / f"{name}.toml", [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_resume_is_bit_exact(tmp_path):
    """Stop at step 3 and resume to 6: every logged value equals the uninterrupted run's, bit for bit."""
    full = tmp_path / "full"
    train(tiny(full, **{"model.router.expert_bias": True, "model.router.z_loss_coef": 1e-3}))
    split = tmp_path / "split"
    train(tiny(split, **{"train.steps": 3, "model.router.expert_bias": True, "model.router.z_loss_coef": 1e-3}))
    summary = train(tiny(split, **{"model.router.expert_bias": True, "model.router.z_loss_coef": 1e-3}))
    assert summary["resumed_from_step"] == 3
    fields = ("step", "loss", "lb_loss", "z_loss", "grad_norm", "lr", "load_min", "load_max", "load_cv")
    a = [{k: r[k] for k in fields} for r in read_metrics(full)]
    b = [{k: r[k] for k in fields} for r in read_metrics(split)]
    assert a == b


def test_weights_only_checkpoint_feeds_init_from_but_not_resume(tmp_path):
    def size(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    train(tiny(tmp_path / "full", **{"train.steps": 2}))
    full = ckpt.latest_checkpoint(tmp_path / "full")
    run = tmp_path / "weights"
    train(tiny(run, **{"train.steps": 2, "checkpoint.weights_only": True}))
    light = ckpt.latest_checkpoint(run)
    assert ckpt.is_weights_only(light) and not ckpt.is_weights_only(full)
    assert size(light) < 0.45 * size(full)  # AdamW's two moments are two thirds of the full state
    cfg = tiny(run)
    model, _, _ = build_model(cfg, Parallel(cfg, torch.device("cpu")))
    ckpt.load_model_weights(light, model)  # what export, evaluation and init_from read
    with pytest.raises(ConfigError, match="checkpoint.resume: .* holds model weights only"):
        train(tiny(run, **{"train.steps": 4}))
    summary = train(tiny(tmp_path / "next", **{"train.steps": 1, "checkpoint.init_from": str(light)}))
    assert math.isfinite(summary["last_loss"])


def test_crashed_save_is_never_resumed(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, **{"train.steps": 2})
    train(cfg)
    good = ckpt.latest_checkpoint(tmp_path)

    def crash(state, checkpoint_id):
        (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train(tiny(tmp_path, **{"train.steps": 4}))
    assert ckpt.latest_checkpoint(tmp_path) == good
    monkeypatch.undo()
    summary = train(tiny(tmp_path, **{"train.steps": 4}))
    assert summary["resumed_from_step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_activation_checkpointing_matches(tmp_path):
    a = train(tiny(tmp_path / "a", **{"train.steps": 2}))
    b = train(tiny(tmp_path / "b", **{"train.steps": 2, "train.activation_checkpointing": True}))
    assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-6)


def test_lr_schedules():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, o, 100) == pytest.approx(0.1)
    assert lr_factor(9, o, 100) == pytest.approx(1.0)
    assert lr_factor(10, o, 100) == pytest.approx(1.0)
    assert lr_factor(99, o, 100) == pytest.approx(0.1, abs=1e-3)
    w = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_factor(s, w, 10) for s in (0, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_grad_accumulation_equals_larger_batch(tmp_path):
    """2 micro-batches of 2 give the same loss and gradient norm as 1 micro-batch of 4."""
    common = {"train.steps": 2, "model.router.lb_loss_coef": 0.0}
    train(tiny(tmp_path / "a", **common, **{"train.grad_accum": 2, "train.micro_batch_size": 2}))
    train(tiny(tmp_path / "b", **common, **{"train.grad_accum": 1, "train.micro_batch_size": 4}))
    for ra, rb in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
