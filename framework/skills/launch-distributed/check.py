"""Launch a distributed layout: check it up front, print the torchrun and SLURM commands, optionally run it.

    python skills/launch-distributed/check.py --config configs/small-qwen3-moe.toml --nproc 8 \
        --set parallel.ep=8
    python skills/launch-distributed/check.py --config configs/tiny-qwen3-moe.toml --nproc 2 \
        --set parallel.pp=2 --set train.grad_accum=2 --run

--run trains --steps steps under torchrun (gloo on CPU, NCCL on GPUs) and the same global batch in one process
(grad_accum x dp micro-batches, every parallel.* key back at its default), then compares step 1's loss: every
layout must reproduce the one-process loss (tests/test_distributed.py holds the framework to this). The last
stdout line is PASS/FAIL; an impossible layout exits 2 with the framework's one-line error.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

PARALLEL_DEFAULTS = ["parallel.pp=1", "parallel.ep=1", "parallel.dp_replicate=1", "parallel.dp_shard=-1"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def sets(overrides: list[str]) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def commands(config: str, overrides: list[str], nproc: int, gpus_per_node: int) -> tuple[str, str]:
    """(torchrun command for one node, or for each node of several; sbatch command), from this folder."""
    train = ["-m", "pithtrain.train", "--config", config, *sets(overrides)]
    nodes, per_node = (1, nproc) if nproc <= gpus_per_node else (nproc // gpus_per_node, gpus_per_node)
    if nodes == 1:
        torchrun = shlex.join(["torchrun", "--nproc-per-node", str(nproc), *train])
    else:
        torchrun = shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", "HEAD_NODE:29500", *train])
        torchrun += "   # on every node"
    env = f"PY={shlex.quote(os.path.abspath(sys.executable))} GPUS_PER_NODE={per_node}"
    slurm = f"{env} " + shlex.join(["sbatch", f"--nodes={nodes}", f"--gpus-per-node={per_node}",
                                    "scripts/slurm.sh", config, *sets(overrides)])
    return torchrun, slurm


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.setdefault("OMP_NUM_THREADS", "1")
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its ranks (each in a session of its own) on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


def train_here(config: str, overrides: list[str], log: Path) -> int:
    """The one-process reference, in this process: it overlaps the launch instead of paying another start."""
    from contextlib import redirect_stdout

    from pithtrain.config import load_config
    from pithtrain.train import train

    print("$ python -m pithtrain.train --config " + shlex.join([config, *sets(overrides)]) + "  (in here)")
    with open(log, "w") as f, redirect_stdout(f):
        try:
            train(load_config(config, overrides))
        except (Exception, SystemExit) as e:  # reported below with the log (train exits on a non-finite loss)
            print(f"error: {type(e).__name__}: {e}")
            return 1
    return 0


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text().splitlines()[-lines:])


def main(argv=None) -> int:
    p = Parser(prog="python skills/launch-distributed/check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="TOML run config, e.g. configs/small-qwen3-moe.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set parallel.ep=2 (repeatable; part of the commands)")
    p.add_argument("--nproc", type=int, required=True, help="processes in all (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the multi-node commands (default 8)")
    p.add_argument("--run", action="store_true", help="launch it here and compare with one process")
    p.add_argument("--steps", type=int, default=2, help="steps for --run (default 2)")
    p.add_argument("--tol", type=float, help="relative tolerance of step 1's loss (1e-5 on CPU, 2e-2 on GPU)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/launch-check"), help="where --run writes")
    p.add_argument("--timeout", type=int, default=600, help="seconds for each --run launch (default 600)")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.steps < 1 or args.gpus_per_node < 1:
        p.error("--nproc, --steps and --gpus-per-node must be >= 1")
    if args.nproc > args.gpus_per_node and args.nproc % args.gpus_per_node:
        p.error(f"--nproc {args.nproc} over several nodes must be a multiple of --gpus-per-node "
                f"{args.gpus_per_node}")
    from pithtrain.config import ConfigError, load_config, validate_parallel

    try:
        cfg = load_config(args.config, args.overrides)
        validate_parallel(cfg, args.nproc)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q, t = cfg.parallel, cfg.train
    dp = q.dp_replicate * q.dp_shard
    print(f"layout: {args.nproc} ranks = pp {q.pp} ({q.pp_schedule}) x dp_replicate {q.dp_replicate} x "
          f"dp_shard {q.dp_shard}, dp_shard = efsdp {q.dp_shard // q.ep} x ep {q.ep}; "
          f"{cfg.model.router.num_experts // q.ep} experts per rank")
    print(f"global batch: micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x dp {dp} = "
          f"{t.micro_batch_size * t.grad_accum * dp} sequences of {t.seq_len} tokens per step")
    if q.pp > 1 and t.grad_accum < q.pp:
        print(f"note: train.grad_accum={t.grad_accum} < parallel.pp={q.pp}: fewer pipeline micro-batches "
              "than stages, so most ranks idle; raise train.grad_accum (the pipeline's micro-batches)")
    torchrun, slurm = commands(args.config, args.overrides, args.nproc, args.gpus_per_node)
    print(f"torchrun: {torchrun}")
    print(f"slurm:    {slurm}")
    if not Path("scripts/slurm.sh").is_file():
        print("note: scripts/slurm.sh is not in this folder; it ships in the PithTrain repository "
              "(framework/scripts/)")
    if not args.run:
        print(f"PASS: layout valid for {args.nproc} processes; commands above (add --run to try it here)")
        return 0

    import torch

    gpu = torch.cuda.is_available() and t.device != "cpu"
    if gpu and args.nproc > torch.cuda.device_count():
        p.error(f"--run needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    tol = args.tol if args.tol is not None else (2e-2 if gpu else 1e-5)
    common = [f"train.steps={args.steps}", "checkpoint.enabled=false", "checkpoint.resume=false",
              "train.eval_batches=1"]
    many, one = args.run_dir / "distributed", args.run_dir / "single"
    args.run_dir.mkdir(parents=True, exist_ok=True)
    dist_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.nproc), "-m", "pithtrain.train", "--config", args.config,
                *sets([*args.overrides, *common, f"train.run_dir={many}"])]
    one_sets = [*args.overrides, *PARALLEL_DEFAULTS, f"train.grad_accum={t.grad_accum * dp}", *common,
                f"train.run_dir={one}"]
    for d in (many, one):
        (d / "metrics.jsonl").unlink(missing_ok=True)
    proc = start(dist_cmd, args.run_dir / "distributed.log")
    if gpu:  # GPUs: one after the other, so the two runs do not share GPU 0's memory
        rc = wait(proc, args.timeout)
        rc_one = train_here(args.config, one_sets, args.run_dir / "single.log")
    else:
        rc_one = train_here(args.config, one_sets, args.run_dir / "single.log")
        rc = wait(proc, args.timeout)
    if rc:
        print(tail(args.run_dir / "distributed.log"))
        why = "timed out" if rc == 124 else "a rank failed"
        log = args.run_dir / "distributed.log"
        print(f"FAIL: the {args.nproc}-rank launch exited {rc} ({why}); log in {log}")
        return 1
    if rc_one:
        print(tail(args.run_dir / "single.log"))
        print(f"FAIL: the one-process reference run failed; log in {args.run_dir / 'single.log'}")
        return 1
    a, b = losses(many), losses(one)
    if sorted(a) != list(range(1, args.steps + 1)) or sorted(b) != sorted(a):
        print(f"FAIL: expected steps 1..{args.steps} in both runs, got {sorted(a)} (distributed), "
              f"{sorted(b)} (single)")
        return 1
    for s in sorted(a):
        rel = abs(a[s] - b[s]) / abs(b[s])
        print(f"step {s}: loss {a[s]:.7f} ({args.nproc} ranks) vs {b[s]:.7f} (1 process), rel diff {rel:.1e}")
    rel = abs(a[1] - b[1]) / abs(b[1])
    if not math.isfinite(a[1]) or rel > tol:
        print(f"FAIL: step 1 loss differs by {rel:.1e} (> {tol:.0e}) from one process with the same global "
              "batch: the layout changes the math (data sharding, loss scaling or a collective)")
        return 1
    print(f"PASS: all {args.nproc} ranks finished {args.steps} steps; step 1 loss matches one process "
          f"(rel diff {rel:.1e} <= {tol:.0e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
