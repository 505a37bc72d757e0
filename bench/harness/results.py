"""The results store of a run folder, and loading/aggregating trial records with pandas.

Run folder layout:
  run.json            {"run_id", "argv", "versions", "started_at", "finished_at", "resumed_at"?, ...}
                      (unix times; finished_at is null while the run is going or after it was killed)
  trials/<id>.json    one TrialRecord (core.TrialRecord.to_dict()) per finished trial
  logs/<id>/          the trial's transcript and logs
  aggregate.csv/.md   per task x framework x agent: median of every numeric metric, pass_rate, n
Every file is written atomically (temp file, fsync, os.replace), so a killed run leaves whole records
or none, and `--resume` can trust whatever is there.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import subprocess
import tempfile
import time
import types
import typing
from pathlib import Path
from urllib.parse import quote, unquote

import pandas as pd

from bench.harness.core import HarnessError, TrialRecord

KEYS = ["task", "framework", "agent"]
NOT_METRICS = {"attempt", "started_at", "finished_at"}  # numeric fields that are not measurements
CATEGORY_ORDER = {"qa": 0, "operate": 1, "feature": 2}


def _numeric_fields() -> list[str]:
    """TrialRecord's int/float fields (optional ones included), in declaration order."""
    out = []
    for name, hint in typing.get_type_hints(TrialRecord).items():
        args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        if args - {type(None)} and args - {type(None)} <= {int, float} and name not in NOT_METRICS:
            out.append(name)
    return out


METRICS = _numeric_fields()


# ---------------------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so readers see the old file or the whole new one, never a part (even on SIGKILL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------- run store


class RunStore:
    """One run folder: trial records, run metadata and the aggregate tables."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        self.trials_dir = self.dir / "trials"

    def trial_path(self, trial_id: str) -> Path:
        return self.trials_dir / (quote(trial_id, safe="-_.,=+@") + ".json")  # task names hold "/"

    def write_trial(self, record: TrialRecord) -> Path:
        path = self.trial_path(record.trial_id)
        atomic_write_json(path, record.to_dict())
        return path

    def finished_trial_ids(self, retry_failure_modes: tuple[str, ...] = ()) -> set[str]:
        """Trial ids with a record (for --resume); records whose failure_mode is in
        `retry_failure_modes` (e.g. "infra_error") are left out so they run again."""
        if not retry_failure_modes:
            return {unquote(p.stem) for p in self.trials_dir.glob("*.json")}
        return {r["trial_id"] for r in _read_records(self.trials_dir)
                if r.get("failure_mode") not in retry_failure_modes}

    def trial_dir(self, trial_id: str) -> Path:
        """Host folder for one trial's transcript and logs: logs/<trial id>/."""
        d = self.dir / "logs" / quote(trial_id, safe="-_.,=+@")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def records(self) -> list[TrialRecord]:
        known = set(TrialRecord.__dataclass_fields__)
        return [TrialRecord(**{k: v for k, v in r.items() if k in known}) for r in _read_records(self.trials_dir)]

    # run.json
    def read_run_meta(self) -> dict:
        p = self.dir / "run.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def write_run_meta(self, **fields) -> dict:
        """Start (or resume) the run: run.json gets run_id, started_at and versions the first time, and keeps
        them on --resume (noting the resume); `fields` (argv, agent, ...) are merged in; finished_at is
        cleared until finish()."""
        old = self.read_run_meta()
        meta = {"run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", "started_at": time.time(),
                "versions": versions()} | old | fields | {"finished_at": fields.get("finished_at")}
        if old:
            meta["resumed_at"] = [*old.get("resumed_at", []), time.time()]
        atomic_write_json(self.dir / "run.json", meta)
        return meta

    def finish(self, **fields) -> dict:
        """Mark the run finished and refresh aggregate.csv/.md from every record there."""
        meta = self.read_run_meta() | fields | {"finished_at": time.time()}
        atomic_write_json(self.dir / "run.json", meta)
        self.write_aggregate()
        return meta

    @property
    def run_id(self) -> str:
        return self.read_run_meta().get("run_id") or self.write_run_meta()["run_id"]

    def write_aggregate(self) -> pd.DataFrame:
        agg = aggregate(load_records([self.dir]))
        atomic_write_text(self.dir / "aggregate.csv", agg.to_csv(index=False))
        atomic_write_text(self.dir / "aggregate.md", to_markdown(agg) + "\n")
        return agg


# ---------------------------------------------------------------------------------------- loading


def versions() -> dict:
    """What produced a run: Python, platform, this package and the git commit of the checkout (if any)."""
    try:
        pkg = importlib.metadata.version("ate-bench")
    except importlib.metadata.PackageNotFoundError:
        pkg = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "ate_bench": pkg,
            "git_commit": commit}


def _read_records(trials_dir: Path) -> list[dict]:
    out = []
    for p in sorted(trials_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HarnessError(f"{p}: unreadable trial record: {e}") from None
        if not isinstance(rec, dict) or not all(k in rec for k in ("trial_id", *KEYS)):
            raise HarnessError(f"{p}: not a trial record (needs trial_id, task, framework, agent)")
        out.append(rec)
    return out


def load_records(run_dirs: list[Path]) -> pd.DataFrame:
    """All trial records under `run_dirs` (each a run folder holding trials/), one row per trial, with a
    `run_dir` column; metric columns are numeric (None -> NaN). Empty frame when there are none."""
    rows = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise HarnessError(f"{d}: no such run folder")
        for rec in _read_records(d / "trials"):
            rows.append(rec | {"run_dir": str(d)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df else math.nan
    df["passed"] = df["passed"].fillna(False).astype(bool) if "passed" in df else False
    df["failure_mode"] = df["failure_mode"].fillna("none") if "failure_mode" in df else "none"
    return df


def task_sort_key(task: str) -> tuple:
    """Q&A, then operate, then feature tasks; numbers in names in numeric order (q2 before q10)."""
    cat = task.split("/", 1)[0]
    return (CATEGORY_ORDER.get(cat, 9), [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", task)])


def aggregate(df: pd.DataFrame, stats: tuple[str, ...] = ("median",)) -> pd.DataFrame:
    """Per task x framework x agent: each `stat` of every metric, pass_rate (mean of passed), n trials.
    Trials that failed for infrastructure reasons measure nothing about the agent: they are left out of
    the statistics and counted in n_infra_error. With several stats, columns are named metric_stat."""
    cols = KEYS + [*(f"{m}_{s}" if len(stats) > 1 else m for m in METRICS for s in stats),
                   "pass_rate", "n", "n_infra_error"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    ok = df["failure_mode"] != "infra_error"
    vals = df[METRICS].where(ok, axis=0)
    vals["pass_rate"] = df["passed"].astype(float).where(ok)
    vals["n"], vals["n_infra_error"] = ok.astype(int), (~ok).astype(int)
    grouped = pd.concat([df[KEYS], vals], axis=1).groupby(KEYS, sort=False)
    agg = grouped.agg({**{m: list(stats) for m in METRICS}, "pass_rate": "mean", "n": "sum",
                       "n_infra_error": "sum"})
    agg.columns = [f"{m}_{s}" if len(stats) > 1 and m in METRICS else m for m, s in agg.columns]
    agg = agg.reset_index()
    agg = agg.iloc[sorted(range(len(agg)), key=lambda i: (task_sort_key(agg.task[i]),
                                                          framework_sort_key(agg.framework[i]), agg.agent[i]))]
    return agg.reset_index(drop=True)[cols]


FRAMEWORK_ORDER = {"pithtrain": 0, "torchtitan": 1, "megatron": 2}


def framework_sort_key(fw: str) -> tuple:
    """PithTrain first (the paper's anchor), then the paper's baselines, then the rest alphabetically."""
    return (FRAMEWORK_ORDER.get(fw, 9), fw)


def fmt_number(v) -> str:
    """Readable cell text: thousands separators for counts, 3 significant digits for small values."""
    if v is None or isinstance(v, str):
        return "" if v is None else v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if float(v).is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def to_markdown(df: pd.DataFrame, fmt=fmt_number) -> str:
    if df.empty:
        return "_(no rows)_"
    return df.map(fmt).to_markdown(index=False, disable_numparse=True)
