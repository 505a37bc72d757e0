"""Side-by-side training throughput: PithTrain, TorchTitan and Megatron-Core on the same model shape and data.

    python -m adapters.throughput --out bench/results/throughput/h100-2026-11-23
    python -m adapters.throughput --table bench/results/throughput/h100-2026-11-23   # rebuild the table only

Each run is a subprocess of the framework's own runner (pithtrain.benchmark, adapters.torchtitan.throughput,
adapters.megatron.throughput) on one GPU, so memory is freed between runs and a crash costs one row. Every
runner trains the shape of a PithTrain config (`small-qwen3-moe`: Qwen3-30B-A3B layers; `small-deepseek-v2-lite`)
at sequence 4096 in bf16 on uniform random tokens, with balanced (forced) or natural routing. The table
recomputes TFLOP/s and MFU for every framework with PithTrain's FLOP formula (pithtrain/benchmark.py says which),
so the ratios compare tokens/s on equal terms. Results: one JSON per run, `results.json`, `table.md`, `table.csv`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"qwen3": "framework/configs/small-qwen3-moe.toml", "deepseek": "framework/configs/small-deepseek-v2-lite.toml"}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
FRAMEWORK_NAMES = {"megatron": "megatron-core"}  # runner name -> the name its results carry

# framework -> [(label, runner arguments)]. Every framework gets the same batch shapes where it can run them: micro-
# batch 2, 2 x 2 with gradient accumulation (16K tokens per optimizer step), and 4 (TorchTitan needs selective AC
# there); compile on. Micro-batch and AC are the knobs that trade memory for speed.
SETTINGS = {
    "pithtrain": [
        ("mb2 compile", ["--set", "train.micro_batch_size=2", "--set", "train.compile=regions"]),
        ("mb2x2-accum compile", ["--set", "train.micro_batch_size=2", "--set", "train.grad_accum=2",
                                 "--set", "train.compile=regions"]),
        ("mb4 compile", ["--set", "train.micro_batch_size=4", "--set", "train.compile=regions"]),
        ("mb8 compile", ["--set", "train.micro_batch_size=8", "--set", "train.compile=regions"]),
    ],
    "torchtitan": [
        ("mb2 no-AC compile", ["--micro-batch", "2", "--ac", "none", "--compile"]),
        ("mb2x2-accum no-AC compile", ["--micro-batch", "2", "--grad-accum", "2", "--ac", "none", "--compile"]),
        ("mb4 selective-AC compile", ["--micro-batch", "4", "--ac", "selective", "--compile"]),
        ("mb2x4-accum no-AC compile", ["--micro-batch", "2", "--grad-accum", "4", "--ac", "none", "--compile"]),
    ],
    "megatron": [  # Megatron-Core's own path without Transformer Engine (which cannot be built on the GPU machine)
        ("mb2 no-recompute local-spec", ["--micro-batch", "2", "--recompute", "none"]),
        ("mb1 no-recompute local-spec", ["--micro-batch", "1", "--recompute", "none"]),
    ],
}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def runner_command(framework: str, shape: str, routing: str, args: list[str], steps: int, warmup: int,
                   out: Path, pithtrain_sets: list[str]) -> list[str]:
    py = sys.executable
    if framework == "pithtrain":
        sets = ["--set", f"model.router.force_balanced={'true' if routing == 'balanced' else 'false'}"]
        for s in pithtrain_sets:
            sets += ["--set", s]
        return [py, "-m", "pithtrain.benchmark", "--config", str(REPO / SHAPES[shape]), *sets, *args,
                "--steps", str(steps), "--warmup", str(warmup), "--out", str(out)]
    module = {"torchtitan": "adapters.torchtitan.throughput", "megatron": "adapters.megatron.throughput"}[framework]
    return [py, "-m", module, "--shape", shape, "--routing", routing, *args, "--steps", str(steps),
            "--warmup", str(warmup), "--out", str(out)]


def flops_per_token(shape: str) -> float:
    """PithTrain's FLOP count per trained token for the shape (the same numerator for every framework)."""
    sys.path.insert(0, str(REPO / "framework"))
    from pithtrain.config import load_config, model_module

    cfg = load_config(str(REPO / SHAPES[shape]), [])
    return model_module(cfg.family).flops_per_token(cfg.model, cfg.train.seq_len)


def run_all(out_dir: Path, frameworks: list[str], shapes: list[str], routings: list[str], steps: int, warmup: int,
            timeout: int, pithtrain_sets: list[str], only: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "framework"), str(REPO),
                                                         os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    plan = [(s, r, f, label, args) for s in shapes for r in routings for f in frameworks
            for label, args in SETTINGS[f] if not only or f"{f}:{label}" in only]
    for i, (shape, routing, fw, label, args) in enumerate(plan, 1):
        name = f"{shape}-{routing}-{fw}-{label.replace(' ', '_')}"
        result_path = out_dir / f"{name}.json"
        if result_path.exists():
            print(f"[{i}/{len(plan)}] {name}: already measured, skipped", flush=True)
            continue
        cmd = runner_command(fw, shape, routing, args, steps, warmup, result_path, pithtrain_sets)
        print(f"[{i}/{len(plan)}] {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        log = out_dir / f"{name}.log"
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        if rc != 0 or not result_path.exists():
            failure = {"framework": fw, "setting": label, "shape": shape, "routing": routing, "error": f"rc={rc}",
                       "log_tail": tail, "command": " ".join(cmd)}
            write_atomic(out_dir / f"{name}.failed.json", json.dumps(failure, indent=1))
            print(f"    failed ({rc}) after {time.time() - start:.0f}s: {tail[-1] if tail else ''}", flush=True)
        else:
            res = json.loads(result_path.read_text())
            res.update(setting=label, shape=shape, routing=routing)
            write_atomic(result_path, json.dumps(res, indent=1))
            print(f"    {res['tokens_per_s']:,.0f} tok/s, peak {res.get('peak_mem_gib', 0):.1f} GiB "
                  f"({time.time() - start:.0f}s)", flush=True)


def build_table(out_dir: Path) -> str:
    """results.json + table.md + table.csv from the run JSONs in out_dir; returns the markdown. Ratios compare
    tokens/s with PithTrain's best run on the same shape and routing at the same tokens per optimizer step
    (`vs_pithtrain_same_batch`), and with PithTrain's best run overall (`vs_pithtrain_best`)."""
    sys.path.insert(0, str(REPO / "framework"))
    import pithtrain

    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "results.json"]
    rows, fpt = [], {}
    for r in runs:
        shape = r.get("shape")
        if shape not in fpt:
            fpt[shape] = flops_per_token(shape)
        peak = next((v for k, v in PEAK_BF16.items() if k in str(r.get("device", ""))), None)
        tps = r.get("tokens_per_s")
        framework = FRAMEWORK_NAMES.get(r.get("framework"), r.get("framework"))
        version = r.get("version") or (pithtrain.__version__ if framework == "pithtrain" else "")
        rows.append({
            "shape": shape, "routing": r.get("routing"), "framework": framework, "setting": r.get("setting"),
            "tokens_per_step": r.get("tokens_per_step") or (
                r.get("micro_batch", 0) * r.get("grad_accum", 1) * r.get("seq_len", 0) or None),
            "version": version, "torch": r.get("torch", ""), "backend": r.get("backend", ""),
            "device": r.get("device", ""),
            "tokens_per_s": round(tps) if tps else None,
            "tflops_per_gpu": round(fpt[shape] * tps / 1e12, 1) if tps else None,
            "mfu": round(fpt[shape] * tps / peak, 4) if tps and peak else None,
            "peak_mem_gib": round(r["peak_mem_gib"], 1) if r.get("peak_mem_gib") else None,
            "error": r.get("error", ""),
        })
    for row in rows:
        if not row["tokens_per_s"]:
            continue
        same = [x for x in rows if x["framework"] == "pithtrain" and x["shape"] == row["shape"]
                and x["routing"] == row["routing"] and x["tokens_per_s"]]
        batch = [x["tokens_per_s"] for x in same if x["tokens_per_step"] == row["tokens_per_step"]]
        row["vs_pithtrain_same_batch"] = round(row["tokens_per_s"] / max(batch), 3) if batch else None
        row["vs_pithtrain_best"] = round(row["tokens_per_s"] / max(x["tokens_per_s"] for x in same), 3) if same else None
    rows.sort(key=lambda x: (x["shape"], x["routing"], x["framework"] != "pithtrain", x["framework"],
                             x["tokens_per_step"] or 0, x["setting"]))
    cols = ["shape", "routing", "framework", "setting", "tokens_per_step", "tokens_per_s", "tflops_per_gpu", "mfu",
            "peak_mem_gib", "vs_pithtrain_same_batch", "vs_pithtrain_best", "version", "backend", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("" if v is None else f"{v:.1%}" if c == "mfu" else f"{v:,}" if c == "tokens_per_s" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({r["device"] for r in rows if r["device"]})
    torches = sorted({r["torch"] for r in rows if r["torch"]})
    md = (f"Device: {', '.join(devices) or 'unknown'}; torch {', '.join(torches) or 'unknown'}. MFU and TFLOP/s use "
          "PithTrain's FLOP formula for every row; `vs_pithtrain_*` = this row's tokens/s / PithTrain's.\n\n")
    md += "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows({c: row.get(c) for c in cols} for row in rows)
    write_atomic(out_dir / "results.json", json.dumps({"rows": rows, "runs": runs}, indent=1))
    write_atomic(out_dir / "table.md", md)
    write_atomic(out_dir / "table.csv", buf.getvalue())
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapters.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for the run JSONs, logs and the table")
    p.add_argument("--table", metavar="DIR", help="only rebuild the table from the run JSONs in DIR")
    p.add_argument("--frameworks", default="pithtrain,torchtitan,megatron")
    p.add_argument("--shapes", default="qwen3,deepseek")
    p.add_argument("--routing", default="balanced,natural")
    p.add_argument("--steps", type=int, default=10, help="measured steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps first (default 5)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run before it is abandoned (default 300)")
    p.add_argument("--only", default="", help="comma-separated FRAMEWORK:SETTING labels to run, e.g. "
                   "'pithtrain:mb4 compile,torchtitan:mb4 selective-AC compile' (default: every setting)")
    p.add_argument("--pithtrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every PithTrain run, e.g. train.compile=regions")
    args = p.parse_args(argv)
    if args.table:
        print(build_table(Path(args.table)))
        return 0
    if not args.out:
        p.error("--out or --table is required")
    frameworks, shapes, routings = (x.split(",") for x in (args.frameworks, args.shapes, args.routing))
    for name, values, known in (("--frameworks", frameworks, SETTINGS), ("--shapes", shapes, SHAPES),
                                ("--routing", routings, ("balanced", "natural"))):
        bad = [v for v in values if v not in known]
        if bad:
            print(f"error: {name}: unknown {bad[0]!r} (choose from {', '.join(known)})", file=sys.stderr)
            return 2
    only = [x for x in args.only.split(",") if x]
    known = {f"{f}:{label}" for f in SETTINGS for label, _ in SETTINGS[f]}
    if any(x not in known for x in only):
        print(f"error: --only: unknown setting {next(x for x in only if x not in known)!r}", file=sys.stderr)
        return 2
    run_all(Path(args.out), frameworks, shapes, routings, args.steps, args.warmup, args.timeout, args.pithtrain_set,
            only)
    print(build_table(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
