"""PithTrain adapter: lay `framework/` out as an agent workspace, launch the standard run, read its metrics.

The workspace is the framework folder as a user would clone it (package at `<ws>/pithtrain`, so
`PYTHONPATH=<ws>` imports it), committed as a reproducible baseline (adapters/workspace.py). `pithtrain-noskills` is the same workspace without `skills/`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

from adapters.workspace import baseline_commit, commit_baseline, empty_dir, git  # noqa: F401  (baseline_commit: adapter API)

NAME = "pithtrain"
VARIANTS = {"pithtrain": {"skills": True}, "pithtrain-noskills": {"skills": False}}
REPO = Path(__file__).resolve().parents[2]
FRAMEWORK_DIR = REPO / "framework"
SMOKE_CONFIG = "tiny-deepseek-v2-lite"  # the tiny CPU config the getting-started task expects

_INCLUDE = ("pithtrain", "configs", "scripts", "tests", "README.md", "AGENTS.md", "pyproject.toml")
_EXCLUDE = ("runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "*.pyc")
def version() -> dict:
    """Package version plus the commit of the repository holding `framework/` (dirty when it has local edits)."""
    out = {"framework": NAME, "version": tomllib.loads((FRAMEWORK_DIR / "pyproject.toml").read_text())["project"]["version"]}
    try:
        out["commit"] = git(["rev-parse", "HEAD"], REPO).strip()
        out["dirty"] = bool(git(["status", "--porcelain", "--", "framework"], REPO).strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def build_workspace(dst: Path, skills: bool = True) -> Path:
    """Copy the framework into `dst` (must be absent or empty) and commit it as the reproducible baseline."""
    dst = empty_dir(dst)
    ignore = shutil.ignore_patterns(*_EXCLUDE)
    for name in (*_INCLUDE, *(("skills",) if skills else ())):
        src = FRAMEWORK_DIR / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    if not skills:  # the ablation: no trace of the skills (their tests and the AGENTS.md section go too)
        (dst / "tests" / "test_skills.py").unlink(missing_ok=True)
        agents = dst / "AGENTS.md"
        text = agents.read_text()
        start = text.find("\n## Skills")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            agents.write_text(text[:start] + (text[end:] if end >= 0 else "\n"))
    return commit_baseline(dst, "PithTrain baseline (ATE-Bench workspace)")


def build(framework: str, dst: Path) -> Path:
    """build_workspace for a framework name of this adapter (`pithtrain`, `pithtrain-noskills`)."""
    if framework not in VARIANTS:
        raise ValueError(f"unknown framework {framework!r} (known: {', '.join(VARIANTS)})")
    return build_workspace(dst, **VARIANTS[framework])


def python_env(workspace: str = "/workspace", cache_dir: str | None = None) -> dict[str, str]:
    """Environment for commands in the sandbox: the workspace's package first on the path, and the builtin
    dataset cache outside the workspace (Q&A workspaces are read-only). Give each trial its own cache_dir
    where the backend shares /tmp between trials (local), so no trial starts with another's warm cache."""
    return {"PYTHONPATH": workspace, "PITHTRAIN_CACHE": cache_dir or "/tmp/pithtrain-cache",
            "PYTHONDONTWRITEBYTECODE": "1"}


def run_spec_command(config: str, steps: int, run_dir: str) -> str:
    """The standard launch command, run from the workspace root; `config` is a name in configs/ or a path."""
    if "/" not in config and not config.endswith(".toml"):
        config = f"configs/{config}.toml"
    return (f"python -m pithtrain.train --config {shlex.quote(config)} --set train.steps={int(steps)} "
            f"--set train.run_dir={shlex.quote(run_dir)}")


def parse_metrics(run_dir: Path) -> list[dict]:
    """One dict per line of `<run_dir>/metrics.jsonl` ([] when absent); a malformed line raises ValueError."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return rows
