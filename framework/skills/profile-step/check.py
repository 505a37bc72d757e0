"""Profile one training step: where does the time go, kernel by kernel (GPU) or op by op (CPU)?

    python skills/profile-step/check.py --config configs/tiny-qwen3-moe.toml [--set k=v] [--top 20] [--nsys]

Builds the model and optimizer exactly as `pithtrain.train` does (train.build_model, build_optimizer,
forward_backward, optimizer_step) on the benchmark's seeded random tokens, runs --warmup steps, then one step
under torch.profiler. Writes `kernel_name,total_time_ms,instances,mean_time_ms` (sorted by total, top N) to
--out and prints it. GPU: CUDA kernel time; CPU: CPU op self time. The last stdout line is PASS/FAIL.
"""

import argparse
import csv
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def aggregate(prof, on_gpu: bool) -> list[tuple[str, float, int]]:
    """(name, total ms, instances) per kernel (GPU) or per op's self CPU time (CPU), largest first. Profiler
    annotations (`pithtrain.*` regions, their GPU-side copies) are ranges, not work, so they are left out."""
    from torch.autograd import DeviceType

    totals, counts = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if getattr(e, "is_user_annotation", False) or e.name.startswith(("pithtrain.", "ProfilerStep")):
            continue
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            spent = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU:
                continue
            spent = e.self_cpu_time_total
        if spent > 0:
            totals[e.name] += spent / 1e3
            counts[e.name] += 1
    return sorted(((n, totals[n], counts[n]) for n in totals), key=lambda r: -r[1])


def profile(cfg, warmup: int, trace: Path | None, nvtx_range: bool) -> tuple[list, str, list[float], bool]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pithtrain.benchmark import RandomTokenStepper
    from pithtrain.parallel.mesh import Parallel
    from pithtrain.train import resolve_device

    par = Parallel(cfg, resolve_device(cfg))
    try:
        device, t = par.device, cfg.train
        stepper = RandomTokenStepper(cfg, par, warmup + 1)
        amp, n_params = stepper.amp_dtype, stepper.n_params
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        losses = []

        def step():
            losses.append(stepper())

        for i in range(warmup):
            start = time.perf_counter()
            step()
            sync()
            ms = (time.perf_counter() - start) * 1e3
            print(f"warmup step {i + 1}/{warmup}: loss {losses[-1]:.4f}, {ms:.1f} ms", flush=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with warnings.catch_warnings(), torch_profile(activities=activities) as prof:
            warnings.simplefilter("ignore")
            if nvtx_range:
                torch.cuda.profiler.start()
            step()
            sync()
            if nvtx_range:
                torch.cuda.profiler.stop()
        wall = (time.perf_counter() - start) * 1e3
        if trace is not None and par.rank == 0:
            prof.export_chrome_trace(str(trace))
        mode = "bf16 autocast" if amp else "fp32"
        what = (f"{cfg.family} {n_params / 1e6:.2f}M params on {device}, {mode}, "
                f"micro-batch {t.micro_batch_size} x seq {t.seq_len} x accum {t.grad_accum}, "
                f"profiled step {wall:.1f} ms wall (profiler overhead included)")
        on_gpu = device.type == "cuda"
        return aggregate(prof, on_gpu), what, losses, on_gpu
    finally:
        par.close()


def run_nsys(argv: list[str], out_dir: Path) -> str:
    """Re-run this script under Nsight Systems, capturing only the profiled step (cudaProfilerApi range)."""
    nsys = shutil.which("nsys")
    if nsys is None:
        return "nsys: not found on PATH; torch.profiler only (install Nsight Systems for a timeline)"
    import torch

    if not torch.cuda.is_available():
        return "nsys: skipped, it profiles CUDA and this machine has no GPU"
    report = out_dir / "step"
    inner = [a for a in argv if a != "--nsys"] + ["--nvtx-range", "--out", str(out_dir / "nsys-inner.csv")]
    cmd = [nsys, "profile", "--trace=cuda,nvtx,osrt", "--capture-range=cudaProfilerApi",
           "--capture-range-end=stop", "--force-overwrite=true", "-o", str(report),
           sys.executable, __file__, *inner]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return f"nsys: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
    rep = f"{report}.nsys-rep"
    return f"nsys: timeline {rep}; kernels: nsys stats --report cuda_gpu_kern_sum {rep}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = Parser(prog="python skills/profile-step/check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="TOML run config, e.g. configs/tiny-qwen3-moe.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (default 2)")
    p.add_argument("--top", type=int, default=20, help="rows in the table and CSV (default 20, at least 3)")
    p.add_argument("--out", type=Path, help="CSV path (default runs/profile-<config>/kernels.csv)")
    p.add_argument("--trace", action="store_true", help="also write trace.json (Chrome trace)")
    p.add_argument("--nsys", action="store_true", help="also capture the step with nsys")
    p.add_argument("--nvtx-range", action="store_true", help=argparse.SUPPRESS)  # --nsys's inner run
    args = p.parse_args(argv)
    if args.top < 3 or args.warmup < 0:
        p.error("--top must be >= 3 and --warmup >= 0")
    from pithtrain.config import ConfigError, load_config, validate_parallel

    try:
        cfg = load_config(args.config, args.overrides)
        validate_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before anything is written
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"profile-{Path(args.config).stem}" / "kernels.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    trace = out.with_name("trace.json") if args.trace else None
    rows, what, losses, on_gpu = profile(cfg, args.warmup, trace, args.nvtx_range)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(what)
    bad = [i + 1 for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        print(f"FAIL: loss is not finite at step(s) {bad} ({losses}); a diverged step is no profile to read")
        return 1
    total = sum(r[1] for r in rows)
    top = rows[: args.top]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel_name", "total_time_ms", "instances", "mean_time_ms"])
        for name, ms, n in top:
            w.writerow([name, f"{ms:.4f}", n, f"{ms / n:.4f}"])
    kind = "GPU kernel time" if on_gpu else "CPU op self time"
    print(f"{'total ms':>10} {'share':>6} {'count':>6} {'mean ms':>9}  name ({kind}; {len(rows)} distinct, "
          f"{total:.1f} ms in all)")
    for name, ms, n in top:
        print(f"{ms:>10.3f} {ms / total:>6.1%} {n:>6} {ms / n:>9.4f}  {name[:100]}")
    if args.nsys:
        print(run_nsys(argv, out.parent))
    if len(top) < 3:
        print(f"FAIL: the profile has {len(top)} entries (< 3): nothing was recorded for the step")
        return 1
    covered = sum(r[1] for r in top) / total
    print(f"PASS: {len(top)} entries ({covered:.0%} of {total:.1f} ms {kind}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
