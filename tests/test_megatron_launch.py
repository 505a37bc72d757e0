"""Megatron-Core launch entry (adapters/megatron/ate_run/, shipped as `ate_run/` into Megatron workspaces): its TOMLs
describe PithTrain's tiny and small DeepSeek-V2-Lite configs exactly, a tiny CPU run writes metrics and
dist_checkpointing checkpoints that load back to the trained weights, and bad input is one line and exit 2.
megatron-core is not a project dependency, so these skip where it is not installed, as in CI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ATE_RUN = REPO / "adapters" / "megatron" / "ate_run"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                or importlib.util.find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install megatron-core==0.16.1)")
PITHTRAIN = {"tiny": "tiny-deepseek-v2-lite.toml", "small": "small-deepseek-v2-lite.toml"}


def run_python(args: list[str], pythonpath: list[Path], cwd: Path, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A Megatron workspace's ate_run/ (megatron.core itself comes from the installed wheel)."""
    import adapters.ate_run as ar

    ws = tmp_path_factory.mktemp("megatron-ws")
    ar.install(ws, "megatron")
    return ws


CONFIGS_SCRIPT = r"""
import argparse, dataclasses, json, warnings
warnings.simplefilter("ignore")
from adapters.megatron import throughput as tp
from adapters.megatron.ate_run import pretrain_gpt as pg

out = {}
for name, tiny in (("tiny", True), ("small", False)):
    cfg = pg.load_config(f"adapters/megatron/ate_run/{name}.toml")
    pith = tp.load_shape("deepseek", tiny=tiny)
    args = argparse.Namespace(lr=pith.optim.lr, routing="natural", experts="sequential", recompute="none",
                              device="cpu", dry_run=False)
    theirs, gpt, _ = tp.transformer_config(pith, args)
    mine = pg.model_config(cfg, "cpu")
    differ = {}
    for f in dataclasses.fields(mine):
        a, b = getattr(mine, f.name), getattr(theirs, f.name)
        if a != b and not (callable(a) and callable(b)):  # init methods: partials made per config
            differ[f.name] = [repr(a), repr(b)]
    out[name] = {
        "params": sum(p.numel() for p in pg.build_model(cfg, "meta").parameters()),
        "pithtrain_params": tp.pithtrain_params(pith), "toml_keys": sorted(cfg["model"]), "differ": differ,
        "gpt_differ": {k: [cfg["gpt"].get(k), v] for k, v in gpt.items() if cfg["gpt"].get(k) != v},
        "type": type(mine).__name__, "force_balancing": mine.moe_router_force_load_balancing,
    }
print("RESULT " + json.dumps(out))
"""


def test_configs_are_pithtrains_models():
    """Both TOMLs build a GPTModel with PithTrain's parameter count, and their whole TransformerConfig (the TOML's
    fields and the ones the entry sets in code) equals the throughput runner's mapping of PithTrain's config with
    learned routing."""
    proc = run_python(["-c", CONFIGS_SCRIPT], [REPO / "framework", REPO], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, r in res.items():
        assert r["params"] == r["pithtrain_params"], name
        assert r["type"] == "MLATransformerConfig" and not r["force_balancing"], name
        assert r["differ"] == {} and r["gpt_differ"] == {}, (name, r["differ"], r["gpt_differ"])
        assert {"num_layers", "hidden_size", "moe_layer_freq", "num_moe_experts", "q_lora_rank"} <= set(r["toml_keys"])
    assert res["small"]["params"] == 2_254_983_168


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_train_tables_are_pithtrains(name, monkeypatch):
    """[train] holds PithTrain's batch, steps, seed, AdamW and warmup + cosine schedule under Megatron-LM's names."""
    monkeypatch.syspath_prepend(str(REPO / "framework"))
    from pithtrain.config import load_config

    pith = load_config(REPO / "framework" / "configs" / PITHTRAIN[name])
    t, o = pith.train, pith.optim
    expect = {"micro_batch_size": t.micro_batch_size, "global_batch_size": t.micro_batch_size * t.grad_accum,
              "seq_length": t.seq_len, "train_iters": t.steps, "seed": t.seed, "lr": o.lr,
              "min_lr": o.lr * o.min_lr_ratio, "lr_warmup_iters": o.warmup_steps, "lr_decay_style": o.schedule,
              "weight_decay": o.weight_decay, "adam_beta1": o.beta1, "adam_beta2": o.beta2, "adam_eps": o.eps,
              "clip_grad": o.grad_clip}
    toml = tomllib.loads((ATE_RUN / f"{name}.toml").read_text())
    assert toml["train"] == pytest.approx(expect)
    assert toml["gpt"]["vocab_size"] == pith.model.vocab_size


RUN_SCRIPT = r"""
import json, sys
import torch
import ate_run.pretrain_gpt as pg
from ate_run import data
from megatron.core.transformer.module import Float16Module

run = sys.argv[1]
final = {}
plain_step = pg.train_step


def recording_step(model, optimizer, scheduler, batches):  # the documented hook: main looks train_step up per step
    out = plain_step(model, optimizer, scheduler, batches)
    final.clear()
    final.update({n: p.detach().float().clone() for n, p in pg.unwrap(model).named_parameters()})
    return out


pg.train_step = recording_step
rc = pg.main(["--config", "ate_run/tiny.toml", "--train-iters", "3", "--save-interval", "1", "--out", run,
              "--device", "cpu"])
assert rc == 0, rc
cfg = json.load(open(f"{run}/config.json"))
with pg.device_mode("cpu"):
    model = pg.build_model(cfg, "cpu")
    pg.load_checkpoint(model, f"{run}/checkpoints/iter_0000003")
    loaded = {n: p.detach().float() for n, p in model.named_parameters()}
    pg.save_checkpoint(model, None, f"{run}/weights_only", save_optim=False)
    other = pg.build_model(cfg, "cpu")
    pg.load_checkpoint(other, f"{run}/weights_only")
    x, y = data.samples([0, 1], 128, "val")
    pos = torch.arange(128).expand(2, -1)
    with torch.no_grad():  # Float16Module: the bf16 forward training used
        losses = [float(Float16Module(m.config, m)(x, pos, None, labels=y).float().mean()) for m in (model, other)]
print("RESULT " + json.dumps({
    "names_equal": sorted(loaded) == sorted(final),
    "max_diff": max(float((loaded[n] - final[n]).abs().max()) for n in loaded),
    "weights_only_equal": all(bool((p.float() == loaded[n]).all()) for n, p in other.named_parameters()),
    "val_losses": losses,
}))
"""


def test_tiny_cpu_run_writes_metrics_and_checkpoints(workspace, tmp_path):
    """Three steps on the CPU emulation: config.json, metrics.jsonl, iter_0000001..3 with optimizer state, and the
    last checkpoint loads (model weights only) into a fresh model with exactly the trained weights; a weights-only
    checkpoint loads too."""
    run = tmp_path / "run"
    script = tmp_path / "check_run.py"
    script.write_text(RUN_SCRIPT)
    proc = run_python([str(script), str(run)], [workspace], workspace, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["device"] == "cpu" and cfg["train"]["train_iters"] == 3 and cfg["checkpoint"]["save_interval"] == 1
    assert cfg["model"]["num_layers"] == 3 and cfg["gpt"]["vocab_size"] == 4096
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "peak_mem_gib"} <= rows[0].keys()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert abs(rows[0]["loss"] - math.log(4096)) < 0.3
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 1e-3, 2e-3])  # Megatron's warmup: lr * (k - 1) / 5
    assert len([line for line in proc.stdout.splitlines() if line.startswith("step ")]) == 3

    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["iter_0000001", "iter_0000002", "iter_0000003"]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    meta = json.loads((ckpts / "iter_0000003" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())
    assert size(run / "weights_only") < size(ckpts / "iter_0000003") / 2  # the other has Adam state

    assert res["names_equal"] and res["max_diff"] == 0.0 and res["weights_only_equal"]
    assert res["val_losses"][0] == res["val_losses"][1] and math.isfinite(res["val_losses"][0])


@pytest.mark.parametrize("case", ["unknown_key", "bad_value", "missing_file"])
def test_bad_input_is_one_line_and_exit_2(case, workspace, tmp_path):
    text = (workspace / "ate_run" / "tiny.toml").read_text()
    config = tmp_path / "bad.toml"
    if case == "unknown_key":
        config.write_text(text.replace("[model]\n", "[model]\nnum_layerz = 3\n"))
        named = "model.num_layerz"
    elif case == "bad_value":
        config.write_text(text.replace("lr = 5e-3", 'lr = "fast"'))
        named = "train.lr"
    else:
        named = str(config)
    run = tmp_path / "run"
    proc = run_python(["-m", "ate_run.pretrain_gpt", "--config", str(config), "--out", str(run), "--device", "cpu"],
                      [workspace], workspace, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr
    assert not run.exists()
