"""The CI regression gate: compare a run's per-task medians with a committed baseline.

  python -m bench.compare --baseline bench/results/<baseline.json | RUN_DIR> RUN_DIR... [--threshold METRIC=FRAC ...]
                          [--tasks ID|CATEGORY ...] [--frameworks NAME ...] [--agents NAME ...]
  python -m bench.compare --write-baseline OUT.json RUN_DIR...

For each (task, framework, agent) of the baseline:
  - deterministic agents (oracle, null, replay): the count metrics (turns, tool calls, tokens, per-turn
    context, cost, reward, pass rate) must match the baseline exactly, median, min and max alike; timing
    metrics (session_duration_s, active_gpu_s, agent_wall_s) are not compared for them.
  - live agents: a metric regresses when the run's median is worse than the baseline median by more than
    max(FRAC x |baseline median|, baseline max - min over its trials); higher is worse for turns, tokens,
    cost and time, lower is worse for reward and pass_rate. FRAC defaults to 0.10; --threshold
    METRIC=FRAC sets one metric, --threshold all=FRAC every metric.
  - a baseline entry missing from the run (or with only infrastructure-failed trials) is a failure;
    entries the baseline lacks are listed as new and do not fail. --tasks limits the gate (baseline and
    run alike) to the named tasks or categories, --frameworks and --agents the baseline to the named
    frameworks and agents, for a run of part of the suite.
Exit status: 0 nothing regressed, 1 something did, 2 bad input (no records, unreadable baseline, bad option).

Baseline file (JSON, written by --write-baseline from one or more run folders, e.g. one per agent;
commit it under bench/results/):
  {"format": "ate-bench-baseline/1", "created_at": <unix time>, "source": [<run folder>...],
   "run_ids": [...],
   "entries": [{"task": "qa/q1-...", "framework": "pithtrain", "agent": "oracle", "n": 3,
                "metrics": {"agent_turns": {"median": 4, "min": 4, "max": 4}, ...,
                            "pass_rate": {"median": 1.0, "min": 1.0, "max": 1.0}}}]}
A metric that is null (unknown, e.g. cost without a price) is not compared. A run folder works as a
baseline too (summarised the same way on the fly).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from bench.harness.core import HarnessError
from bench.harness.results import KEYS, aggregate, atomic_write_json, fmt_number, load_records

FORMAT = "ate-bench-baseline/1"
DETERMINISTIC = {"oracle", "null", "replay"}
GATED = ["agent_turns", "tool_calls", "input_uncached_tokens", "cache_read_tokens", "cache_write_tokens",
         "output_tokens", "reasoning_tokens", "per_turn_context_p50", "cost_usd", "session_duration_s",
         "agent_wall_s", "active_gpu_s", "reward", "pass_rate"]
TIMING = {"session_duration_s", "active_gpu_s", "agent_wall_s"}
HIGHER_IS_BETTER = {"reward", "pass_rate"}
DEFAULT_THRESHOLD = 0.10
STATS = ("median", "min", "max")

Key = tuple[str, str, str]
Summary = dict[Key, dict]  # key -> {"n": int, "metrics": {metric: {"median", "min", "max"}}}


def summarize(df: pd.DataFrame) -> Summary:
    """Median, min and max of every gated metric per task x framework x agent (NaN -> None)."""
    agg = aggregate(df, stats=STATS)
    out: Summary = {}
    for row in agg.to_dict("records"):
        metrics = {}
        for m in GATED:
            if m == "pass_rate":
                vals = dict.fromkeys(STATS, row["pass_rate"])
            else:
                vals = {s: row[f"{m}_{s}"] for s in STATS}
            vals = {s: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                    for s, v in vals.items()}
            metrics[m] = vals
        out[(row["task"], row["framework"], row["agent"])] = {"n": int(row["n"]), "metrics": metrics}
    return out


def load_summary(path: Path) -> Summary:
    """A baseline JSON file, or run folder(s) summarised the same way."""
    if path.is_dir():
        df = load_records([path])
        if df.empty:
            raise HarnessError(f"{path}: no trial records (expected {path}/trials/*.json)")
        return summarize(df)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HarnessError(f"baseline {path}: unreadable: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("entries"), list):
        raise HarnessError(f"baseline {path}: not a {FORMAT} file (make one with --write-baseline)")
    try:
        return {(e["task"], e["framework"], e["agent"]): {"n": e["n"], "metrics": e["metrics"]}
                for e in raw["entries"]}
    except (KeyError, TypeError) as e:
        raise HarnessError(f"baseline {path}: malformed entry ({e})") from None


def write_baseline(out: Path, run_dirs: list[Path]) -> int:
    for run_dir in run_dirs:
        if load_records([run_dir]).empty:
            raise HarnessError(f"{run_dir}: no trial records (expected {run_dir}/trials/*.json)")
    df = load_records(run_dirs)
    entries = [dict(zip(KEYS, k)) | v for k, v in summarize(df).items()]
    atomic_write_json(out, {"format": FORMAT, "created_at": time.time(), "source": [str(d) for d in run_dirs],
                            "run_ids": sorted(set(df.run_id.astype(str))), "entries": entries})
    return len(entries)


def only_tasks(summary: Summary, selectors: list[str]) -> Summary:
    """The entries of `summary` whose task is named by a selector: `category/id`, `id` or `category`."""
    def named(task: str) -> bool:
        category, _, tid = task.partition("/")
        return bool({task, category, tid} & set(selectors))

    return {k: v for k, v in summary.items() if named(k[0])}


def gate(baseline: Path, run_dirs: list[Path], tasks: list[str] | None = None,
         thresholds: dict[str, float] | None = None, agents: list[str] | None = None,
         frameworks: list[str] | None = None) -> list[dict]:
    """compare() of run folders against a baseline file or folder, optionally limited to some tasks (and,
    for callers gating one framework's or agent's trials, to those)."""
    base, cur = load_summary(baseline), summarize(load_records(run_dirs))
    if agents:
        base = {k: v for k, v in base.items() if k[2] in agents}
    if frameworks:
        base = {k: v for k, v in base.items() if k[1] in frameworks}
    if tasks:
        base, cur = only_tasks(base, tasks), only_tasks(cur, tasks)
    if not base:
        raise HarnessError("the baseline has no entry for the chosen tasks, frameworks and agents")
    return compare(base, cur, thresholds or parse_thresholds([]))


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """METRIC=FRAC items -> a fraction per gated metric; `all=FRAC` changes the default for the rest."""
    default, explicit = DEFAULT_THRESHOLD, {}
    for item in items:
        name, sep, val = item.partition("=")
        try:
            frac = float(val)
        except ValueError:
            frac = -1.0
        if not sep or frac < 0 or not math.isfinite(frac):
            raise HarnessError(f"--threshold {item!r}: expected METRIC=FRAC with FRAC >= 0, e.g. agent_turns=0.2")
        if name == "all":
            default = frac
        elif name in GATED:
            explicit[name] = frac
        else:
            raise HarnessError(f"--threshold {item!r}: unknown metric {name!r} (one of: all, {', '.join(GATED)})")
    return {m: explicit.get(m, default) for m in GATED}


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)  # exact up to float summation order


def compare(base: Summary, cur: Summary, thresholds: dict[str, float]) -> list[dict]:
    """One row per comparison: key, metric, baseline, current, allowed, status (ok | improved | REGRESSED |
    MISSING | new); only REGRESSED and MISSING fail."""
    rows = []
    for key, b in base.items():
        row0 = dict(zip(KEYS, key))
        if key not in cur or cur[key]["n"] == 0:
            why = "not in run" if key not in cur else "only infrastructure-failed trials"
            rows.append(row0 | {"metric": "*", "baseline": f"n={b['n']}", "current": why, "allowed": "",
                                "status": "MISSING"})
            continue
        exact = key[2] in DETERMINISTIC
        for m in GATED:
            bm, cm = b["metrics"].get(m) or {}, cur[key]["metrics"].get(m) or {}
            if bm.get("median") is None or (exact and m in TIMING):
                continue
            row = row0 | {"metric": m, "baseline": bm["median"], "current": cm.get("median")}
            if cm.get("median") is None:
                rows.append(row | {"allowed": "", "status": "MISSING"})
                continue
            if exact:
                same = all(_same(bm.get(s), cm.get(s)) for s in STATS)
                detail = "" if same or not _same(bm["median"], cm["median"]) else (  # a trial differs
                    f" (min-max {fmt_number(cm.get('min'))}-{fmt_number(cm.get('max'))}, "
                    f"was {fmt_number(bm.get('min'))}-{fmt_number(bm.get('max'))})")
                rows.append(row | {"allowed": "exact", "status": "ok" if same else "REGRESSED" + detail})
                continue
            spread = (bm["max"] - bm["min"]) if bm.get("max") is not None and bm.get("min") is not None else 0.0
            allowed = max(thresholds[m] * abs(bm["median"]), spread)
            delta = cm["median"] - bm["median"]
            worse = -delta if m in HIGHER_IS_BETTER else delta
            status = "REGRESSED" if worse > allowed + 1e-12 else "improved" if -worse > allowed + 1e-12 else "ok"
            sign = "-" if m in HIGHER_IS_BETTER else "+"
            rows.append(row | {"allowed": f"{sign}{fmt_number(allowed)}", "status": status})
    for key in sorted(cur.keys() - base.keys()):
        rows.append(dict(zip(KEYS, key)) | {"metric": "*", "baseline": "", "current": f"n={cur[key]['n']}",
                                            "allowed": "", "status": "new"})
    return rows


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"].startswith(("REGRESSED", "MISSING"))]


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="ATE-Bench regression gate", show_lines=False, header_style="bold")
    for col in (*KEYS, "metric", "baseline", "current", "allowed", "status"):
        table.add_column(col, justify="right" if col in ("baseline", "current", "allowed") else "left",
                         overflow="fold")
    style = {"ok": "green", "improved": "cyan", "new": "yellow"}
    for r in rows:
        s = r["status"]
        table.add_row(*(fmt_number(r[c]) if c in ("baseline", "current") else str(r[c])
                        for c in (*KEYS, "metric", "baseline", "current", "allowed")),
                      f"[{style.get(s, 'bold red')}]{s}[/]")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="*", type=Path, metavar="RUN_DIR", help="run folder(s) to check")
    ap.add_argument("--baseline", type=Path, help="baseline JSON (see above) or a baseline run folder")
    ap.add_argument("--threshold", action="append", default=[], metavar="METRIC=FRAC",
                    help=f"relative tolerance for live agents (default {DEFAULT_THRESHOLD}); repeatable")
    ap.add_argument("--tasks", nargs="+", metavar="ID|CATEGORY",
                    help="gate only these tasks or categories (baseline and run alike)")
    ap.add_argument("--frameworks", nargs="+", metavar="NAME",
                    help="gate only the baseline entries of these frameworks (e.g. the one the run used)")
    ap.add_argument("--agents", nargs="+", metavar="NAME",
                    help="gate only the baseline entries of these agents (e.g. the one the run used)")
    ap.add_argument("--write-baseline", type=Path, metavar="OUT",
                    help="summarise the RUN_DIRs (one per agent, say) into baseline file OUT and exit")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)  # CI logs: wide, never squeezed
    try:
        if args.write_baseline:
            if args.baseline or args.tasks or args.frameworks or args.agents or not args.run_dirs:
                raise HarnessError("--write-baseline OUT takes RUN_DIR(s) and no --baseline, --tasks, --frameworks "
                                   "or --agents")
            n = write_baseline(args.write_baseline, args.run_dirs)
            print(f"wrote {args.write_baseline}: {n} task x framework x agent entries")
            return 0
        if not args.baseline or not args.run_dirs:
            raise HarnessError("need --baseline FILE_OR_DIR and at least one RUN_DIR (or --write-baseline)")
        thresholds = parse_thresholds(args.threshold)
        if not args.baseline.exists():
            raise HarnessError(f"baseline {args.baseline}: no such file or folder")
        if load_records(args.run_dirs).empty:
            raise HarnessError(f"no trial records in {', '.join(map(str, args.run_dirs))} (expected RUN_DIR/trials/*.json)")
        rows = gate(args.baseline, args.run_dirs, args.tasks, thresholds, agents=args.agents,
                    frameworks=args.frameworks)
    except HarnessError as e:
        print(f"bench.compare: {e}", file=sys.stderr)
        return 2
    print_table(rows, console)
    bad = failed(rows)
    console.print(f"{len(rows)} comparisons, {len(bad)} failed" + (": REGRESSION" if bad else ": ok"),
                  style="bold red" if bad else "bold green")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
