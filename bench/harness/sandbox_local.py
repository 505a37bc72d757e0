"""Local sandbox backend: for hosts without Docker (e.g. the GPU machines).

A temp folder holds a copy of the workspace; commands run as subprocesses with rlimits, a timeout that
kills the whole process tree, and a clean environment. When the harness runs as root, agent commands
run as an unprivileged user (`ate`, created if missing; else `nobody`), so a read-only workspace is
really read-only for the agent. This is weak isolation: same kernel, same network and the same
filesystem outside the workspace.

    sb = LocalSandbox(Path("adapters/.../workspace"), read_only=True, memory_gb=8)
    try:
        r = sb.exec("python -c 'import pithtrain'", timeout=60)
    finally:
        sb.close()
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness.core import WORKSPACE, ExecResult

AGENT_USER = "ate"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_OUTPUT = 8 << 20  # bytes of command output kept (head and tail beyond that)
KILL_GRACE_S = 3.0  # SIGTERM -> SIGKILL

_user_lock = threading.Lock()


def agent_ids() -> tuple[int, int] | None:
    """(uid, gid) that agent commands run as, creating the `ate` user if needed; None when not root."""
    if os.geteuid() != 0:
        return None
    with _user_lock:
        for attempt in range(2):
            try:
                pw = pwd.getpwnam(AGENT_USER)
                return pw.pw_uid, pw.pw_gid
            except KeyError:
                if attempt == 0 and shutil.which("useradd"):
                    subprocess.run(
                        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                         "--shell", "/usr/sbin/nologin", AGENT_USER],
                        capture_output=True, check=False,
                    )
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid


def _procs() -> list[tuple[int, int, int, bytes]]:
    """(pid, ppid, pgrp, state) of every process, zombies included, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
            fields = raw[raw.rindex(b")") + 2:].split()
            out.append((int(entry), int(fields[1]), int(fields[2]), fields[0]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _tree(pgid: int) -> list[int]:
    """Live pids in process group `pgid` or below its leader (children that left the group via setsid)."""
    procs = _procs()
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in procs:
        children.setdefault(ppid, []).append(pid)
    below, todo = set(), [pgid]
    while todo:
        for c in children.get(todo.pop(), []):
            below.add(c)
            todo.append(c)
    return [pid for pid, _, pgrp, state in procs if (pgrp == pgid or pid in below) and state != b"Z"]


def _signal_tree(pgid: int, sig: int) -> None:
    for pid in _tree(pgid):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


_access_lock = threading.Lock()
_access_done: set[str] = set()


def grant_traverse(paths: list[str]) -> None:
    """Let the agent user reach the harness's interpreter: add o+x (traverse, not list) to ancestors that
    lack it, e.g. /root when Python lives in /root/.pyenv. Prints what it changed."""
    with _access_lock:
        for path in paths:
            p = Path(path).resolve()
            for d in reversed([p, *p.parents] if p.is_dir() else list(p.parents)):
                if str(d) in _access_done:
                    continue
                _access_done.add(str(d))
                mode = d.stat().st_mode
                if not mode & stat.S_IXOTH:
                    os.chmod(d, mode | stat.S_IXOTH)
                    print(f"sandbox_local: added o+x to {d} so the agent user can run {sys.executable}",
                          file=sys.stderr)


class LocalSandbox:
    """core.Sandbox on the host. `workspace_src` (a folder, or None for an empty one) is copied into a temp
    folder; `workspace` and `host_workspace` are that copy. `memory_gb` sets RLIMIT_AS, which breaks CUDA
    (it reserves huge virtual ranges), so it is not applied when `gpus` is given; `gpus` (indices or UUIDs)
    become CUDA_VISIBLE_DEVICES (none given: an empty value, so the trial sees no GPU). `max_procs` is RLIMIT_NPROC for agent commands (per user: all live
    local trials share the `ate` user, so it bounds them together). `cpus` is advisory: it sets
    OMP_NUM_THREADS. Paths under core.WORKSPACE given to exec/copy_in map to the copy."""

    kind = "local"

    def __init__(
        self, workspace_src: Path | None, *, read_only: bool = False, cpus: float | None = None,
        memory_gb: float | None = None, gpus: list[str] | None = None, max_procs: int = 4096,
        python: str = sys.executable,
    ) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="ate-local-"))
        self._closed = False
        self._pgids: set[int] = set()
        self._ids = agent_ids()
        self.gpus = list(gpus or [])
        self.cpus, self.memory_gb, self.max_procs = cpus, memory_gb, max_procs
        self.read_only = read_only
        try:
            os.chmod(self._root, 0o711)  # the agent user may pass through, not list or write
            ws = self._root / "workspace"
            if workspace_src is not None:
                shutil.copytree(workspace_src, ws, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                ws.mkdir()
            self.host_workspace = ws
            self.workspace = str(ws)
            self.harness_dir = str(self._root / "harness")  # root-owned: the agent may read, not write
            os.mkdir(self.harness_dir, 0o755)
            self.agent_env: dict[str, str] = {}  # added to every agent command's environment (e.g. the meter)
            self._home = self._root / "home"
            self._tmp = self._root / "tmp"
            for d in (self._home, self._tmp):
                d.mkdir(mode=0o700)
                if self._ids:
                    os.chown(d, *self._ids)
            self._path = f"{Path(python).parent}:{BASE_PATH}"  # the harness's venv first, unresolved
            # Login shells (codex runs `bash -lc`) reset PATH from /etc/profile; restore ours after it.
            (self._home / ".bash_profile").write_text(f'export PATH="{self._path}"\n')
            if self._ids:
                os.chown(self._home / ".bash_profile", *self._ids)
            if self._ids:
                grant_traverse([python, sys.prefix, sys.base_prefix])
            self.set_read_only(read_only)
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        who = f"user {pwd.getpwuid(self._ids[0]).pw_name}" if self._ids else "the harness's own user"
        ro = ("read-only enforced by ownership (agent is not root)" if self._ids
              else "read-only only by chmod (not enforced: the agent owns the files)")
        self.isolation_note = (
            f"local sandbox: WEAK isolation - agent commands run as {who} on the same kernel, network and "
            f"filesystem (outside the workspace copy) as the harness; {ro}; limits: rlimits and timeouts only."
        )

    # ------------------------------------------------------------------------------------ paths

    def _host_path(self, path: str) -> Path:
        """A sandbox path as the host sees it: core.WORKSPACE/... and relative paths map into the copy."""
        if path == WORKSPACE or path.startswith(WORKSPACE + "/"):
            path = self.workspace + path[len(WORKSPACE):]
        p = Path(path)
        return p if p.is_absolute() else self.host_workspace / p

    # ------------------------------------------------------------------------------------ exec

    def _env(self, extra: dict[str, str] | None, as_agent: bool) -> dict[str, str]:
        env = {
            "PATH": self._path, "HOME": str(self._home), "TMPDIR": str(self._tmp), "LANG": "C.UTF-8",
            "PYTHONPATH": self.workspace,  # the workspace copy shadows any installed framework package
        }
        if as_agent and self._ids:
            env["USER"] = env["LOGNAME"] = pwd.getpwuid(self._ids[0]).pw_name
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)  # none given: none visible, as in a container
        if self.cpus:
            env["OMP_NUM_THREADS"] = str(max(1, int(self.cpus)))
        if as_agent:
            env.update(self.agent_env)
        env.update(extra or {})
        return env

    def _limits(self, as_agent: bool) -> list[tuple[int, tuple[int, int]]]:
        limits = [(resource.RLIMIT_CORE, (0, 0))]
        if as_agent:
            limits.append((resource.RLIMIT_NPROC, (self.max_procs, self.max_procs)))
        if self.memory_gb and not self.gpus:
            n = int(self.memory_gb * (1 << 30))
            limits.append((resource.RLIMIT_AS, (n, n)))
        return limits

    def exec(
        self, cmd: str, *, timeout: float, env: dict[str, str] | None = None, workdir: str | None = None,
        as_agent: bool = True,
    ) -> ExecResult:
        if self._closed:
            raise RuntimeError("sandbox is closed")
        limits = self._limits(as_agent)

        def preexec() -> None:  # keep tiny: runs between fork and exec
            for which, value in limits:
                resource.setrlimit(which, value)

        ids = self._ids if as_agent else None
        cwd = self._host_path(workdir) if workdir else self.host_workspace
        t0 = time.monotonic()
        with tempfile.TemporaryFile(dir=self._root) as out:  # a file, not a pipe: background jobs can't block us
            proc = subprocess.Popen(
                ["bash", "-c", cmd], cwd=cwd, env=self._env(env, as_agent), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
                user=ids[0] if ids else None, group=ids[1] if ids else None,
                extra_groups=[] if ids else None,
            )
            self._pgids.add(proc.pid)
            timed_out = False
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc.pid)
                proc.wait()
                code = 124
            duration = time.monotonic() - t0
            if not _tree(proc.pid):
                self._pgids.discard(proc.pid)
            out.seek(0, os.SEEK_END)
            size = out.tell()
            out.seek(0)
            if size <= MAX_OUTPUT:
                data = out.read()
            else:
                head = out.read(MAX_OUTPUT // 8)
                out.seek(size - MAX_OUTPUT // 2)
                data = head + b"\n[... output truncated ...]\n" + out.read()
        return ExecResult(exit_code=code, output=data.decode(errors="replace"), duration_s=duration,
                          timed_out=timed_out)

    def _kill(self, pgid: int) -> None:
        """SIGTERM the process tree, then SIGKILL whatever is left after a grace period."""
        _signal_tree(pgid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        while _tree(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_tree(pgid, signal.SIGKILL)

    # ------------------------------------------------------------------------------------ files

    def _fix_owner(self, top: Path) -> None:
        """Agent-owned and writable when not read-only; root-owned, readable, not writable otherwise."""
        def fix(p: str, is_dir: bool) -> None:
            st = os.lstat(p)
            if os.path.islink(p):
                if self._ids:
                    os.lchown(p, *(self._ids if not self.read_only else (0, 0)))
                return
            mode = st.st_mode & 0o7777
            if self.read_only:
                mode = (mode & ~0o222 if not self._ids else mode & ~0o022) | (0o555 if is_dir else 0o444)
                if self._ids:
                    os.chown(p, 0, 0)
            else:
                mode |= 0o700 if is_dir else 0o600
                if self._ids:
                    os.chown(p, *self._ids)
            os.chmod(p, mode)

        if not top.exists():
            return
        fix(str(top), top.is_dir() and not top.is_symlink())
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirnames, filenames in os.walk(top):
                for d in dirnames:
                    fix(os.path.join(dirpath, d), True)
                for f in filenames:
                    fix(os.path.join(dirpath, f), False)

    def copy_in(self, src: Path, dst: str) -> None:
        target = self._host_path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
        if target == self.host_workspace or self.host_workspace in target.parents:
            self._fix_owner(target)

    def set_read_only(self, read_only: bool) -> None:
        self.read_only = read_only
        self._fix_owner(self.host_workspace)

    # ------------------------------------------------------------------------------------ cleanup

    def stop_agent_processes(self) -> None:
        """Kill whatever the agent left running (background jobs), so the verifier sees settled files."""
        for pgid in list(self._pgids):
            _signal_tree(pgid, signal.SIGKILL)
        self._pgids.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop_agent_processes()

        def onerror(func, path, _exc):  # chmod a-w folders (non-root read-only) block deletion
            try:
                os.chmod(os.path.dirname(path), 0o700)
                func(path)
            except OSError:
                pass

        shutil.rmtree(self._root, onerror=onerror)

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
