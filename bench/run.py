"""Run agents on tasks: `python -m bench.run --agent AGENT --framework FRAMEWORK [options]`.

With no options it runs the oracle agent on PithTrain over every task that fits this machine (CPU
tasks when no GPU is present), in Docker when an engine answers, else in the local sandbox. Each
finished trial is one JSON record under OUT/trials/; `--resume` skips those already there, so a
killed run loses no finished trial. Ends with a summary table; `python -m bench.report OUT` draws
the charts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.harness.agents import AGENT_NAMES
from bench.harness.core import HarnessError, discover_tasks
from bench.harness.gpus import GpuPool
from bench.harness.judge import Judge
from bench.harness.results import RunStore
from bench.harness.trial import FRAMEWORKS, TrialPlan, make_backend, run_trial

console = Console(stderr=True)
if not console.is_terminal:  # logs (CI, files): wide enough that the summary table is not truncated
    console = Console(stderr=True, width=150)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", default="oracle", choices=AGENT_NAMES, help="agent to run (default: oracle)")
    p.add_argument("--framework", default="pithtrain", choices=FRAMEWORKS,
                   help="framework under test; a run covers the tasks that list it (torchtitan, megatron: the Q&A tasks, and the operate and feature tasks where a GPU is given)")
    p.add_argument("--tasks", nargs="+", default=["all"], metavar="ID|CATEGORY",
                   help="task ids, categories (qa, operate, feature) or category/id; default: all")
    p.add_argument("--trials", type=int, default=1, help="trials per task (default 1)")
    p.add_argument("--sandbox", choices=["auto", "docker", "local"], default="auto",
                   help="docker, local (weaker isolation), or auto: docker when an engine answers")
    p.add_argument("--model", default=None, help="model name passed to live agents")
    p.add_argument("--upstream", default=None,
                   help="model API base URL the accounting proxy forwards to (default: the agent's public API)")
    p.add_argument("--script", type=Path, default=None, help="a fake-server script (bench/harness/fake_server.py): the replay agent's recorded "
                        "trajectory, or any live agent run offline against our fake model")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once (default 1)")
    p.add_argument("--gpus", default="auto",
                   help="GPUs to hand out: 'auto' (all visible), 'none', or a comma list of indices/UUIDs")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/bench/<time>-<agent>-<framework>)")
    p.add_argument("--resume", action="store_true", help="skip trials already recorded in --out")
    p.add_argument("--judge-model", default=None, metavar="MODEL",
                   help="optional LLM judge of feature-task diffs against tests/rubric.md (subscores, not reward)")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="OpenAI-compatible API base URL for the judge (key: $ATE_JUDGE_API_KEY)")
    args = p.parse_args(argv)
    if bool(args.judge_model) != bool(args.judge_url):
        p.error("--judge-model and --judge-url go together")
    if args.trials < 1 or args.jobs < 1:
        p.error("--trials and --jobs must be >= 1")
    if args.resume and args.out is None:
        p.error("--resume needs --out (the run folder to continue)")
    if args.agent == "replay" and args.script is None:
        p.error("--agent replay needs --script (a recorded trajectory)")
    return args


def summary_table(records) -> Table:
    table = Table(title="ATE-Bench trials")
    for col in ("task", "trial", "reward", "failure", "turns", "out tok", "session s", "gpu s", "overhead s"):
        table.add_column(col, justify="left" if col in ("task", "failure") else "right")
    for r in sorted(records, key=lambda r: (r.task, r.trial_id)):
        table.add_row(
            r.task, str(r.attempt), f"{r.reward:.2f}", r.failure_mode if r.failure_mode != "none" else "",
            str(r.agent_turns), str(r.output_tokens), f"{r.session_duration_s:.1f}", f"{r.active_gpu_s:.1f}",
            f"{r.harness_overhead_s:.2f}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = discover_tasks(args.tasks, args.framework)
        gpu_pool = GpuPool.from_spec(args.gpus)
        backend = make_backend(args.sandbox)
    except HarnessError as e:
        console.print(f"error: {e}", markup=False)
        return 2
    # gpus_optional tasks run on CPU without one
    runnable = [t for t in tasks if t.gpus_needed(args.framework) <= len(gpu_pool)]
    for t in tasks:
        if t not in runnable:
            console.print(f"skip {t.name}: needs {t.gpus_needed(args.framework)} GPU(s) on {args.framework}, "
                          f"{len(gpu_pool)} available", markup=False)
    if not runnable:
        console.print("error: no task to run (see skips above)")
        return 2
    out = args.out or Path("runs/bench") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.agent}-{args.framework}"
    store = RunStore(out)
    store.write_run_meta(argv=sys.argv if argv is None else ["bench.run", *argv], agent=args.agent,
                         framework=args.framework, sandbox=backend.kind)
    judge = Judge(args.judge_model, args.judge_url, os.environ.get("ATE_JUDGE_API_KEY", "")) if args.judge_model else None
    done = store.finished_trial_ids(retry_failure_modes=("infra_error",)) if args.resume else set()
    plans = [
        TrialPlan(task=t, framework=args.framework, agent=args.agent, attempt=i, model=args.model,
                  upstream=args.upstream, script=args.script, run_id=store.run_id, judge=judge)
        for t in runnable for i in range(1, args.trials + 1)
    ]
    todo = [p for p in plans if p.trial_id not in done]
    console.print(f"{backend.kind} sandbox: {backend.note}", markup=False)
    console.print(f"{len(todo)} trial(s) to run ({len(plans) - len(todo)} already recorded) -> {out}", markup=False)

    records = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task(f"{args.agent} on {args.framework}", total=len(todo))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_trial, plan, backend, gpu_pool, store): plan for plan in todo}
            for fut in as_completed(futures):
                record = fut.result()
                records.append(record)
                mark = "[green]pass[/]" if record.passed else f"[red]fail[/] ({record.failure_mode})"
                progress.console.print(f"  {record.task} #{record.attempt}: {mark} reward {record.reward:.2f}")
                progress.advance(bar)
    store.finish()
    all_records = store.records()
    console.print(summary_table(all_records))
    passed = sum(r.passed for r in all_records)
    console.print(f"{passed}/{len(all_records)} passed; records in {out}/trials; report: python -m bench.report {out} --out {out}/report",
                  markup=False)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
