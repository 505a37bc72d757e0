"""Distributed layouts on CPU (gloo, processes spawned here): each equals the single-process run.

For the tiny configs with fixed seed and data, the losses, balance losses and gradient norms of ep=2, pp=2,
dp=2 (FSDP2), HSDP, ep=2 x pp=2 and DualPipeV (with the overlapped expert all-to-all) match one process at the
same global batch; per-parameter gradients of expert and dense weights match; a checkpoint saved under
ep=2 x pp=2 resumes in one process with the same next-step loss; expert dispatch/combine is exact for skewed
routing (everything to one rank, empty experts, a rank with no tokens).
"""

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CONFIGS, run_module

from pithtrain.config import ConfigError, load_config, validate_parallel

SMALL = {"train.steps": 3, "train.micro_batch_size": 2, "train.seq_len": 32, "train.log_every": 100,
         "train.eval_batches": 1, "checkpoint.enabled": False, "model.router.z_loss_coef": 1e-3}


def config(run_dir, name="tiny-qwen3-moe", **overrides):
    sets = {**SMALL, "train.run_dir": str(run_dir), **overrides}
    return load_config(CONFIGS / f"{name}.toml", [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args, timeout: float = 150):
    """Run fn(*args) in `world` gloo ranks (torchrun's environment variables); fail after `timeout` seconds."""
    port = _free_port()
    ctx = mp.start_processes(_entry, args=(fn, world, port, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks of {fn.__name__} did not finish in {timeout} s")


def _train(run_dir, name, overrides):
    from pithtrain.train import train

    train(config(run_dir, name, **overrides))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "lb_loss", "z_loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=rel), (ra["step"], key)
        assert ra["load_max"] == rb["load_max"] and ra["load_min"] == rb["load_min"]  # routing unchanged


# (name, ranks, overrides of the distributed run, grad_accum of the one-process run with the same global batch)
LAYOUTS = [
    ("ep2", 2, {"parallel.ep": 2, "train.grad_accum": 1}, 2),
    ("pp2", 2, {"parallel.pp": 2, "train.grad_accum": 2}, 2),
    ("fsdp2", 2, {"train.grad_accum": 1}, 2),
    ("hsdp2x2-ep2", 4, {"parallel.dp_replicate": 2, "parallel.ep": 2, "train.grad_accum": 1}, 4),
    ("ep2-pp2", 4, {"parallel.ep": 2, "parallel.pp": 2, "train.grad_accum": 2}, 4),
    ("dualpipev-ep2-pp2-overlap", 4, {"parallel.ep": 2, "parallel.pp": 2, "parallel.pp_schedule": "dualpipev",
                                      "train.grad_accum": 4, "model.num_hidden_layers": 4}, 8),
]


@pytest.mark.parametrize("name, world, overrides, accum", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_single_process(tmp_path, name, world, overrides, accum):
    from pithtrain.train import train

    layers = {k: v for k, v in overrides.items() if k.startswith("model.")}
    train(config(tmp_path / "one", **layers, **{"train.grad_accum": accum}))
    spawn(_train, world, tmp_path / "many", "tiny-qwen3-moe", overrides)
    assert_same_run(metrics(tmp_path / "many"), metrics(tmp_path / "one"))


def test_deepseek_ep2_pp2_matches(tmp_path):
    """DeepSeek-V2 (a dense first layer, shared experts, MLA) under ep=2 x pp=2."""
    from pithtrain.train import train

    train(config(tmp_path / "one", "tiny-deepseek-v2-lite", **{"train.grad_accum": 4}))
    spawn(_train, 4, tmp_path / "many", "tiny-deepseek-v2-lite",
          {"parallel.ep": 2, "parallel.pp": 2, "train.grad_accum": 2})
    assert_same_run(metrics(tmp_path / "many"), metrics(tmp_path / "one"))


def _gradients(out, overrides):
    """One step's forward/backward; every rank writes the full gradients of the parameters it holds."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from pithtrain.checkpoint import _global_name
    from pithtrain.data import DataLoader, TokenShards, builtin_dataset
    from pithtrain.parallel.expert import OVERLAP
    from pithtrain.parallel.mesh import Parallel
    from pithtrain.train import build_model, forward_backward

    cfg = config(out, overrides.pop("name", "tiny-qwen3-moe"), **overrides)
    par = Parallel(cfg, torch.device("cpu"))
    model, _, _ = build_model(cfg, par)
    t = cfg.train
    loader = DataLoader(TokenShards(builtin_dataset()), t.seq_len, t.micro_batch_size, t.grad_accum, par.dp_rank,
                        par.dp_size)
    forward_backward(model, [loader.next_batch() for _ in range(t.grad_accum)], par, par.device, None)
    grads = {_global_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for n, p in model.named_parameters()}
    torch.save({"grads": grads, "turns": OVERLAP.turns}, out / f"rank{par.rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    par.close()


@pytest.mark.parametrize("overrides", [
    {"parallel.ep": 2, "parallel.pp": 2, "train.grad_accum": 2},
    {"parallel.ep": 2, "parallel.pp": 2, "parallel.pp_schedule": "dualpipev", "train.grad_accum": 4},
], ids=["1f1b", "dualpipev-overlap"])
def test_gradients_of_expert_and_dense_weights_match(tmp_path, overrides):
    common = {"model.num_hidden_layers": 4, "model.router.lb_loss_level": "sequence"}
    (tmp_path / "one").mkdir()
    _gradients(tmp_path / "one", {**common, "train.grad_accum": 2 * overrides["train.grad_accum"]})
    ref = torch.load(tmp_path / "one" / "rank0.pt")["grads"]
    (tmp_path / "many").mkdir()
    spawn(_gradients, 4, tmp_path / "many", {**common, **overrides})
    got, turns = {}, 0
    for r in range(4):
        saved = torch.load(tmp_path / "many" / f"rank{r}.pt")
        got.update(saved["grads"])
        turns += saved["turns"]
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any("experts.w_gate_up" in n for n in ref) and any("self_attn.q_proj" in n for n in ref)
    if overrides.get("parallel.pp_schedule") == "dualpipev":
        assert turns > 0  # forward and backward threads really took turns at the exchanges


def test_checkpoint_reshards_to_one_process(tmp_path):
    """Save under ep=2 x pp=2 after step 2, resume in one process: step 3 equals the uninterrupted run's."""
    from pithtrain.train import train

    common = {"checkpoint.enabled": True}
    train(config(tmp_path / "one", **common, **{"train.grad_accum": 4}))
    spawn(_train, 4, tmp_path / "split", "tiny-qwen3-moe",
          {**common, "train.steps": 2, "parallel.ep": 2, "parallel.pp": 2, "train.grad_accum": 2})
    summary = train(config(tmp_path / "split", **common, **{"train.grad_accum": 4}))
    assert summary["resumed_from_step"] == 2
    assert_same_run(metrics(tmp_path / "split"), metrics(tmp_path / "one"))


def _dispatch(out):
    """Expert parallel dispatch/combine against the one-process GroupedExperts, under skewed routing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from pithtrain.models.blocks import GroupedExperts
    from pithtrain.parallel import expert

    dist.init_process_group("gloo")
    rank, world, num_experts, hidden, top_k = dist.get_rank(), dist.get_world_size(), 8, 16, 2
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    full = GroupedExperts(num_experts, hidden, 12)
    torch.nn.init.normal_(full.w_gate_up, std=0.1)
    torch.nn.init.normal_(full.w_down, std=0.1)
    n = num_experts // world
    sharded = GroupedExperts(num_experts, hidden, 12)
    for name in ("w_gate_up", "w_down"):
        local = getattr(full, name).detach()[rank * n:(rank + 1) * n].clone()
        setattr(sharded, name, torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False)))
    ep = expert.ExpertParallel(mesh.get_group(), num_experts)
    sent = []
    exchange = expert._exchange
    expert._exchange = lambda x, o, i, g: sent.append(x.shape[0]) or exchange(x, o, i, g)
    cases = {
        "all to expert 0 and 1 (one rank)": lambda t: torch.tensor([[0, 1]] * t),
        "experts 2, 5 and 7 only": lambda t: torch.tensor([[2, 7], [5, 2], [7, 5]] * (t // 3) + [[2, 5]] * (t % 3)),
        "rank 1 sends nothing": lambda t: torch.tensor([[3, 6]] * t) if rank == 0 else torch.zeros(0, 2).long(),
        "random": lambda t: torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(t)]),
    }
    for case, make_ids in cases.items():
        torch.manual_seed(1 + rank)
        ids = make_ids(10)
        tokens = ids.shape[0]
        x = torch.randn(tokens, hidden, requires_grad=True)
        w = torch.rand(tokens, top_k, requires_grad=True)
        dy = torch.randn(tokens, hidden)
        sent.clear()
        y = ep(x, ids, w, sharded)
        (y * dy).sum().backward()
        rows = sent[0]  # tokens this rank sent, after merging duplicates on the same rank
        x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        full.zero_grad()
        y_ref = full(x_ref, ids, w_ref)
        (y_ref * dy).sum().backward()
        torch.testing.assert_close(y, y_ref, msg=case)
        torch.testing.assert_close(x.grad, x_ref.grad, msg=case)
        torch.testing.assert_close(w.grad, w_ref.grad, msg=case)
        for name in ("w_gate_up", "w_down"):  # mean over ranks of each rank's expert gradient
            ref = getattr(full, name).grad.clone()
            dist.all_reduce(ref)
            got = getattr(sharded, name).grad.to_local()
            torch.testing.assert_close(got, ref[rank * n:(rank + 1) * n] / world, msg=f"{case}: {name}")
            getattr(sharded, name).grad = None
        distinct = sum(len({int(e) // n for e in row}) for row in ids)
        assert rows == distinct, (case, rows, distinct)
    dist.destroy_process_group()
    (out / f"ok{rank}").write_text("ok")


def test_dispatch_combine_skewed_routing(tmp_path):
    spawn(_dispatch, 2, tmp_path)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


@pytest.mark.parametrize("overrides, world, key", [
    ({"parallel.ep": 3}, 3, "parallel.ep"),  # 3 does not divide 8 experts
    ({"parallel.pp": 2}, 3, "world size"),
    ({"parallel.ep": 2, "parallel.dp_shard": 1}, 2, "parallel.ep"),
    ({"parallel.pp": 2, "parallel.pp_schedule": "dualpipev"}, 2, "model.num_hidden_layers"),
    ({"parallel.pp": 2, "parallel.pp_schedule": "zb"}, 2, "parallel.pp_schedule"),
    ({"parallel.pp": 2, "parallel.pp_schedule": "dualpipev", "model.num_hidden_layers": 4}, 2, "train.grad_accum"),
])
def test_impossible_layouts_fail_fast(tmp_path, overrides, world, key):
    with pytest.raises(ConfigError, match=key) as e:
        validate_parallel(config(tmp_path, **overrides), world_size=world)
    assert "\n" not in str(e.value)


def test_cli_layout_without_torchrun_exits_2(tmp_path):
    r = run_module("pithtrain.train", "--config", str(CONFIGS / "tiny-qwen3-moe.toml"),
                   "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "parallel.pp=2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "world size 1" in r.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_script_launches_torchrun(tmp_path):
    """scripts/slurm.sh under stand-ins for srun/scontrol: one node, two CPU ranks through torchrun, ep=2."""
    import subprocess
    import sys

    from conftest import FRAMEWORK

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit, run in place
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": sys.executable, "GPUS_PER_NODE": "2",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "7", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(_free_port())}
    sets = [f"{k}={json.dumps(v)}" for k, v in {**SMALL, "train.steps": 2, "train.run_dir": str(tmp_path / "run"),
                                                 "parallel.ep": 2}.items()]
    r = subprocess.run(["bash", str(FRAMEWORK / "scripts" / "slurm.sh"), str(CONFIGS / "tiny-qwen3-moe.toml"),
                        *[a for s in sets for a in ("--set", s)]], env=env, cwd=FRAMEWORK.parent,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 ranks: pp 1 (1f1b), dp 2 (replicate 1 x shard 2), ep 2" in r.stdout
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1, 2]
