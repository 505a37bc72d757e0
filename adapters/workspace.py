"""What every framework adapter shares: the reproducible baseline commit of a workspace, and the pinned wheels
the baseline frameworks' workspaces are unpacked from.

A workspace is a fresh git repository whose single baseline commit has a fixed author and date, so the same
files always give the same commit hash, and verifiers can diff against (or export) the baseline.

Wheels: `wheel(requirement)` finds a pinned wheel (`torchtitan==0.2.2`) in `.whl/` at the repository root (where
`adapters/*/fetch_wheels.sh` puts them for the GPU machine) or in `$ATE_WHEEL_CACHE` (default
`~/.cache/ate-bench/wheels`), and otherwise downloads it there from the package index (`pip download --no-deps`).
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_CACHE = Path(os.environ.get("ATE_WHEEL_CACHE", "~/.cache/ate-bench/wheels")).expanduser()
_BASELINE_DATE = "2025-01-01T00:00:00+0000"
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "ATE-Bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_AUTHOR_DATE": _BASELINE_DATE,
    "GIT_COMMITTER_NAME": "ATE-Bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_COMMITTER_DATE": _BASELINE_DATE,
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,  # no user hooks, signing or templates
}
GITIGNORE = "runs/\n__pycache__/\n*.egg-info/\n.pytest_cache/\n.ruff_cache/\n.cache/\n"


def git(args: list[str], cwd: Path) -> str:
    env = {**os.environ, **_GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def empty_dir(dst: Path) -> Path:
    """`dst`, created; FileExistsError when it holds anything."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"workspace folder {dst} is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def commit_baseline(dst: Path, message: str) -> Path:
    """Make `dst` a git repository whose one commit (fixed author and date) holds all its files."""
    if not (dst / ".gitignore").exists():
        (dst / ".gitignore").write_text(GITIGNORE)
    git(["init", "-q", "-b", "main"], dst)
    git(["add", "-A"], dst)
    git(["commit", "-q", "--no-gpg-sign", "--no-verify", "-m", message], dst)
    return dst


def plain_python_env(workspace: str = "/workspace", cache_dir: str | None = None) -> dict[str, str]:
    """Environment for commands in a sandbox whose framework needs nothing but its package on the path."""
    return {"PYTHONPATH": workspace, "PYTHONDONTWRITEBYTECODE": "1"}


def baseline_commit(workspace: Path) -> str:
    """The workspace's root commit (what build made), even after the agent committed on top."""
    return git(["rev-list", "--max-parents=0", "HEAD"], Path(workspace)).split()[-1]


def _wheel_name(requirement: str) -> tuple[str, str]:
    name, sep, ver = requirement.partition("==")
    if not sep:
        raise ValueError(f"{requirement!r}: pin a version (name==X.Y.Z)")
    return name.replace("-", "_").lower(), ver


def wheel(requirement: str) -> Path:
    """The wheel file of a pinned requirement: local copy, else downloaded into the cache (no dependencies)."""
    name, ver = _wheel_name(requirement)
    for folder in (REPO / ".whl", WHEEL_CACHE):
        hits = sorted(folder.glob(f"{name}-{ver}-*.whl"))
        if hits:
            return hits[0]
    import tempfile

    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEEL_CACHE, prefix=".download-") as tmp:  # then renamed: atomic
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", "--platform",
                            "manylinux_2_28_x86_64", "-d", tmp, requirement], capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{name}-{ver}-*.whl"))
        if r.returncode != 0 or not got:
            raise RuntimeError(f"{requirement}: no wheel in .whl/ or {WHEEL_CACHE}, and pip download failed: "
                               f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}")
        os.replace(got[0], WHEEL_CACHE / got[0].name)
    return WHEEL_CACHE / got[0].name


def unpack_wheel(path: Path, dst: Path, top: str) -> dict:
    """Extract the wheel's `top/` package into `dst`; -> its metadata (name, version, description, license)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        for n in names:
            if n.startswith(f"{top}/") and not n.endswith("/"):
                z.extract(n, dst)
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        lic = [n for n in names if ".dist-info/" in n and Path(n).name.upper().startswith("LICENSE")]
        license_text = z.read(lic[0]).decode(errors="replace") if lic else ""
    return {"name": meta["Name"], "version": meta["Version"], "description": meta.get_payload(),
            "license": license_text}


def package_workspace(dst: Path, requirement: str, top: str, title: str, source_env: str,
                      framework: str | None = None) -> tuple[Path, dict]:
    """A baseline framework's workspace: its package tree at the root as a user's checkout has it, its README
    and LICENSE, plus (with `framework`) the standard run spec's `ate_run/` folder (adapters/ate_run), committed
    as the baseline. From the pinned registry wheel, or from a checkout of the official
    repository at the matching tag when `$source_env` names one (its `top/` folder, README.md and LICENSE are
    copied). -> (workspace, version record)."""
    import shutil

    dst = empty_dir(dst)
    src = os.environ.get(source_env)
    if src:
        src_dir = Path(src).expanduser()
        if not (src_dir / top).is_dir():
            raise FileNotFoundError(f"${source_env}={src}: no {top}/ package folder there")
        shutil.copytree(src_dir / top, dst / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("README.md", "LICENSE"):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, dst / name)
        try:
            rev = git(["rev-parse", "HEAD"], src_dir).strip()
        except (OSError, subprocess.CalledProcessError):
            rev = "unknown"
        info = {"version": requirement.partition("==")[2], "source": f"checkout {src_dir} at {rev}"}
    else:
        path = wheel(requirement)
        meta = unpack_wheel(path, dst, top)
        (dst / "README.md").write_text(meta["description"])
        if meta["license"]:
            (dst / "LICENSE").write_text(meta["license"])
        info = {"version": meta["version"], "source": f"wheel {path.name}"}
    if framework:
        from adapters import ate_run

        ate_run.install(dst, framework)
    commit_baseline(dst, f"{title} {info['version']} baseline (ATE-Bench workspace)")
    return dst, info
