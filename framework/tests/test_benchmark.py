"""The throughput benchmark and the step pieces it measures: result fields, the profiler breakdown, the fused
optimizer's clipping, force-balanced routing and compiled regions."""

import json
import math

import torch
from conftest import CONFIGS, run_module

from pithtrain.config import load_config
from pithtrain.models.blocks import Router, RouterConfig
from pithtrain.parallel.mesh import Parallel
from pithtrain.train import apply_compile, build_model, optimizer_step


def test_benchmark_cli_reports_throughput_and_breakdown(tmp_path):
    out = tmp_path / "result.json"
    r = run_module("pithtrain.benchmark", "--config", str(CONFIGS / "tiny-deepseek-v2-lite.toml"), "--steps", "2",
                   "--warmup", "1", "--set", "train.micro_batch_size=2", "--set", "model.router.force_balanced=true",
                   "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "result:" in r.stdout and "tok/s" in r.stdout
    res = json.loads(out.read_text())
    assert res["routing"] == "balanced" and res["steps"] == 2 and res["tokens_per_step"] == 2 * 128
    assert res["tokens_per_s"] > 0 and math.isclose(res["tokens_per_s"], res["tokens_per_step"] / res["step_time_s"])
    assert res["flops_per_token"] > 0 and res["mfu"] is None  # no MFU without a known GPU peak
    b = res["breakdown_ms"]
    for region in ("attention", "router", "dispatch", "experts", "combine", "mlp", "loss", "optimizer"):
        assert b[region] > 0, region  # every region of the tiny DeepSeek (one dense layer, then MoE) is seen
    assert math.isclose(sum(v for k, v in b.items() if k != "total"), b["total"], abs_tol=2e-3)  # 3 decimals
    assert b["other"] < 0.5 * b["total"]  # backward ops are traced back to their forward regions


def test_benchmark_bad_input_exits_2_without_output(tmp_path):
    out = tmp_path / "result.json"
    r = run_module("pithtrain.benchmark", "--config", str(CONFIGS / "tiny-qwen3-moe.toml"), "--set",
                   "train.compile=fast", "--out", str(out))
    assert r.returncode == 2 and "train.compile" in r.stderr and not out.exists()
    r = run_module("pithtrain.benchmark", "--config", str(CONFIGS / "tiny-qwen3-moe.toml"), "--steps", "0")
    assert r.returncode == 2 and "--steps" in r.stderr


def test_fused_adamw_clip_equals_scaling_the_gradients():
    """The fused optimizer takes the clip factor as `grad_scale`; the result equals clipping first."""
    cfg = load_config(CONFIGS / "tiny-qwen3-moe.toml", ["optim.grad_clip=0.05"])
    par = Parallel(cfg, torch.device("cpu"))
    models = [build_model(cfg, par)[0] for _ in range(2)]
    x = torch.randint(0, 100, (2, 16))
    for m in models:
        m(x, labels=x).loss.backward()
    decay = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    fused = torch.optim.AdamW(models[0].parameters(), fused=True, **decay)
    plain = torch.optim.AdamW(models[1].parameters(), foreach=True, **decay)
    norms = []
    for m, opt in zip(models, (fused, plain)):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        norms.append(optimizer_step(m, opt, sched, par, cfg.optim.grad_clip))
    assert torch.equal(norms[0], norms[1]) and norms[0] > 0.05  # the clip is active
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_force_balanced_routing_loads_every_expert_equally_and_trains_the_router():
    torch.manual_seed(0)
    router = Router(16, RouterConfig(num_experts=8, top_k=3, force_balanced=True))
    torch.nn.init.normal_(router.weight)
    out = router(torch.randn(40, 16))
    assert out.load.tolist() == [15] * 8  # 40 tokens x 3 slots over 8 experts
    assert all(len(set(row)) == 3 for row in out.expert_ids.tolist())  # a token's experts are distinct
    out.gate_weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_compiled_regions_match_eager():
    """train.compile=regions gives the eager model's loss and gradients (CPU inductor, tiny model)."""
    cfg = load_config(CONFIGS / "tiny-qwen3-moe.toml", ["model.num_hidden_layers=1"])
    par = Parallel(cfg, torch.device("cpu"))
    eager, compiled = build_model(cfg, par)[0], build_model(cfg, par)[0]
    apply_compile(compiled, "regions")
    x = torch.randint(0, 100, (2, 16))
    losses = []
    for m in (eager, compiled):
        loss = m(x, labels=x).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
