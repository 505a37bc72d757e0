"""Tables and charts from ATE-Bench runs: python -m bench.report RUN_DIR... --out DIR

Loads every trial record (RUN_DIR/trials/*.json) of the given runs and writes into DIR:
  report.md              everything below in one page, charts embedded
  medians.csv / .md      per task x framework x agent: median over trials of agent_turns, the four
                         token counts, per_turn_context_p50, session_duration_s, active_gpu_s,
                         cost_usd and reward; pass_rate (share of trials passed); n trials
  ratios.csv / .md       each framework's medians divided by PithTrain's on the same task and agent
                         (> 1: the framework cost the agent more), plus a geometric mean over tasks;
                         absent when no PithTrain trials were given
  <metric>.png           grouped bars per task, one bar per framework (PithTrain first), for Agent
                         Turns, Active GPU Time, Output Tokens, Session Duration and Per-Turn Context;
                         with several agents, one set per agent (<metric>__<agent>.png)
DIR is built in a temporary folder and then swapped in, so it is never half written; an existing DIR is
replaced only when it is a previous report. Trials that failed on infrastructure are left out of the
medians (counted in n_infra_error). No trial records -> one-line error, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.harness.core import HarnessError  # noqa: E402
from bench.harness.results import (  # noqa: E402
    KEYS,
    aggregate,
    framework_sort_key,
    load_records,
    task_sort_key,
    to_markdown,
)

ANCHOR = "pithtrain"
TABLE_METRICS = ["agent_turns", "input_uncached_tokens", "cache_read_tokens", "cache_write_tokens",
                 "output_tokens", "per_turn_context_p50", "session_duration_s", "active_gpu_s", "cost_usd",
                 "reward"]
RATIO_METRICS = [m for m in TABLE_METRICS if m != "reward"]
CHARTS = [  # (metric, title, unit kind, y axis label before the unit)
    ("agent_turns", "Agent Turns", "count", "Agent turns"),
    ("active_gpu_s", "Active GPU Time", "time", "Active GPU time"),
    ("output_tokens", "Output Tokens", "tokens", "Output tokens"),
    ("session_duration_s", "Session Duration", "time", "Session duration"),
    ("per_turn_context_p50", "Per-Turn Context", "tokens", "Median input per model call"),
]
CATEGORY_NAMES = {"qa": "Q&A", "operate": "Operate", "feature": "New features"}
DISPLAY = {"pithtrain": "PithTrain", "torchtitan": "TorchTitan", "megatron": "Megatron-LM"}
COLORS = {"pithtrain": "#D1495B", "torchtitan": "#2E86AB", "megatron": "#66A182"}
SPARE_COLORS = ["#EDAE49", "#8E6C8A", "#6C757D", "#3D405B", "#F4A259"]
MARKER = "report.md"  # a folder holding this is a previous report and may be replaced


def medians(df: pd.DataFrame) -> pd.DataFrame:
    agg = aggregate(df)
    cols = KEYS + TABLE_METRICS + ["pass_rate", "n"] + (["n_infra_error"] if agg.n_infra_error.any() else [])
    return agg[cols]


def ratios(med: pd.DataFrame) -> pd.DataFrame | None:
    """other / PithTrain per task and agent (0/0 -> NaN, x/0 -> inf), then a geometric-mean row per
    framework and agent over the tasks whose ratio is finite and positive."""
    if ANCHOR not in set(med.framework):
        return None
    base = med[med.framework == ANCHOR][["task", "agent", *RATIO_METRICS]]
    other = med[med.framework != ANCHOR][["task", "framework", "agent", *RATIO_METRICS]]
    if other.empty:
        return None
    m = other.merge(base, on=["task", "agent"], suffixes=("", "_anchor"))
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in RATIO_METRICS:
            m[c] = m[c] / m.pop(f"{c}_anchor")
    rows = [m]
    for (fw, agent), g in m.groupby(["framework", "agent"], sort=False):
        geo = {c: float(np.exp(np.log(v[np.isfinite(v) & (v > 0)]).mean())) if (np.isfinite(v) & (v > 0)).any()
               else math.nan for c in RATIO_METRICS for v in [g[c].to_numpy(dtype=float)]}
        rows.append(pd.DataFrame([{"task": "geomean (all tasks)", "framework": fw, "agent": agent, **geo}]))
    return pd.concat(rows, ignore_index=True)[["task", "framework", "agent", *RATIO_METRICS]]


def fmt_ratio(v) -> str:
    if isinstance(v, str):
        return v
    return "—" if v is None or math.isnan(v) else ("∞" if math.isinf(v) else f"{v:.2f}×")


# ---------------------------------------------------------------------------------------- charts


def framework_colors(frameworks: list[str]) -> dict[str, str]:
    spare = iter(SPARE_COLORS * 4)
    return {fw: COLORS.get(fw) or next(spare) for fw in frameworks}


def _scale(kind: str, vmax: float) -> tuple[float, str]:
    if kind == "time":
        return (3600.0, "hours") if vmax >= 7200 else (60.0, "minutes") if vmax >= 120 else (1.0, "seconds")
    if kind == "tokens":
        return (1e6, "million tokens") if vmax >= 2e6 else (1e3, "thousand tokens") if vmax >= 2e3 else (1.0, "tokens")
    return 1.0, "model calls"


def _compact(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def bar_chart(med: pd.DataFrame, metric: str, title: str, kind: str, ylabel: str, colors: dict[str, str],
              path: Path, subtitle: str = "") -> str | None:
    """Grouped bars (task x framework) of one metric, leaving out tasks with no non-zero value; returns a
    note when the chart was skipped or tasks were left out, else None."""
    if metric not in med:
        return f"{title}: skipped, metric not in the records"
    table = med.pivot_table(index="task", columns="framework", values=metric, aggfunc="first", dropna=False)
    vals = table.to_numpy(dtype=float)
    if not np.isfinite(vals).any() or np.nanmax(np.abs(vals)) == 0:
        return f"{title}: skipped, no non-zero data"
    empty = [t for t in table.index if not (np.nan_to_num(table.loc[t].to_numpy(dtype=float)) != 0).any()]
    tasks = sorted((t for t in table.index if t not in empty), key=task_sort_key)  # e.g. no GPU in Q&A
    fws = sorted(table.columns, key=framework_sort_key)
    table = table.loc[tasks, fws]
    fws = [fw for fw in fws if np.isfinite(table[fw].to_numpy(dtype=float)).any()]  # no such task: no bar, no key
    table = table[fws]
    div, unit = _scale(kind, float(np.nanmax(vals)))
    n_t, n_f = len(tasks), len(fws)
    width = 0.8 / n_f
    fig, ax = plt.subplots(figsize=(min(max(7.0, 0.16 * n_t * n_f + 0.3 * n_t + 1.5), 18.0), 5.0))
    x = np.arange(n_t)
    for i, fw in enumerate(fws):
        y = table[fw].to_numpy(dtype=float) / div
        bars = ax.bar(x + (i - (n_f - 1) / 2) * width, y, width, label=DISPLAY.get(fw, fw), color=colors[fw],
                      edgecolor="white", linewidth=0.5, zorder=2)
        if n_t * n_f <= 30:
            ax.bar_label(bars, labels=[_compact(v) for v in y], fontsize=7, padding=2)
    cats = [t.split("/", 1)[0] if "/" in t else "" for t in tasks]
    split = len(set(cats)) > 1  # label categories once, above their section, instead of on every tick
    labels = [t.split("/", 1)[1] if split and "/" in t else t for t in tasks]
    rotate = n_t > 3 or max(map(len, labels)) > 24
    ax.set_xticks(x, labels, rotation=35 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor", fontsize=8.5)
    ax.set_xlim(-0.6, n_t - 0.4)
    ax.set_ylim(0, np.nanmax(vals) / div * (1.22 if split else 1.12))
    if split:
        starts = [i for i in range(n_t) if i == 0 or cats[i] != cats[i - 1]] + [n_t]
        for a, b in zip(starts, starts[1:]):
            if a:
                ax.axvline(a - 0.5, color="#999999", linewidth=0.8, linestyle="--", zorder=1)
            ax.text((a + b - 1) / 2, 0.97, CATEGORY_NAMES.get(cats[a], cats[a]), transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=9, color="#555555")
    ax.set_ylabel(f"{ylabel} ({unit})")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.grid(axis="y", color="#dddddd", linewidth=0.7, zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"{title}{f' — {subtitle}' if subtitle else ''}  ·  median over trials, lower is better",
                 loc="left", fontsize=11, pad=22)
    ax.legend(frameon=False, ncol=n_f, fontsize=9, loc="lower left", bbox_to_anchor=(0.0, 1.0),
              borderaxespad=0.1, handlelength=1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return f"{title}: {len(empty)} task(s) with no data left out" if empty else None


# ---------------------------------------------------------------------------------------- report


def build(df: pd.DataFrame, out: Path) -> list[str]:
    """Write every table and chart into `out`; returns the notes (skipped charts, missing ratios)."""
    med = medians(df)
    notes: list[str] = []
    (out / "medians.csv").write_text(med.to_csv(index=False))
    med_md = to_markdown(med)
    (out / "medians.md").write_text(med_md + "\n")
    rat = ratios(med)
    if rat is None:
        notes.append("ratios: skipped, " + ("no PithTrain trials" if ANCHOR not in set(med.framework)
                                            else "only PithTrain trials"))
        rat_md = ""
    else:
        rat.to_csv(out / "ratios.csv", index=False)
        rat_md = to_markdown(rat, fmt=fmt_ratio)
        (out / "ratios.md").write_text(rat_md + "\n")

    colors = framework_colors(sorted(set(med.framework), key=framework_sort_key))
    agents = sorted(set(med.agent))
    charts = []
    for agent in agents:
        sub = med[med.agent == agent]
        for metric, title, kind, ylabel in CHARTS:
            name = f"{metric}.png" if len(agents) == 1 else f"{metric}__{agent}.png"
            note = bar_chart(sub, metric, title, kind, ylabel, colors, out / name, subtitle=agent)
            if note:
                notes.append(note + (f" (agent {agent})" if len(agents) > 1 else ""))
            if (out / name).exists():
                charts.append((title, name))

    runs = sorted(set(df.run_id.astype(str)))
    lines = [
        "# ATE-Bench report", "",
        f"{len(df)} trials from run(s) {', '.join(runs)}; agents: {', '.join(agents)}; "
        f"frameworks: {', '.join(DISPLAY.get(f, f) for f in colors)}.", "",
        "## Median over trials per task and framework", "",
        "pass_rate: share of trials passed; n: trials counted (infrastructure failures left out).", "",
        med_md, "",
    ]
    if rat_md:
        lines += ["## Ratio to PithTrain", "", "Framework median / PithTrain median on the same task "
                  "(> 1: the agent paid more than on PithTrain).", "", rat_md, ""]
    if charts:
        lines += ["## Charts", ""] + [f"![{t}]({n})\n" for t, n in charts]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    (out / MARKER).write_text("\n".join(lines))
    return notes


def write_report(run_dirs: list[Path], out: Path) -> tuple[pd.DataFrame, list[str]]:
    """Load, build in a temporary sibling folder, then swap it in for `out`."""
    df = load_records(run_dirs)
    if df.empty:
        raise HarnessError(f"no trial records in {', '.join(map(str, run_dirs))} (expected RUN_DIR/trials/*.json)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise HarnessError(f"--out {out}: exists and is not a previous report; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        notes = build(df, tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return df, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (holding trials/)")
    ap.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder to write")
    args = ap.parse_args(argv)
    try:
        df, notes = write_report(args.run_dirs, args.out)
    except HarnessError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {args.out}/report.md: {len(df)} trials, {df.task.nunique()} tasks, "
          f"{df.framework.nunique()} framework(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
