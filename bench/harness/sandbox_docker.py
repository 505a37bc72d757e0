"""Docker sandbox backend on docker-py: one container per trial from a per-framework image.

The workspace sits at core.WORKSPACE, bind-mounted from a host temp folder (the only writable mount;
mounted read-only for Q&A tasks, which the kernel enforces). No network (`network_mode=none`): the
model API is reached through the accounting proxy's unix socket, whose folder is mounted at /ate/proxy,
and a small forwarder inside the container relays 127.0.0.1:PROXY_PORT to it. CPU, memory and pid
limits; GPUs handed out by UUID (GpuPool: one live trial per GPU). Containers carry labels so that
`sweep_leftovers` can remove what a dead harness left behind.

Several engines: pass a docker.DockerClient or a URL (unix://, tcp://, ssh://); `engines_from_env()`
reads ATE_DOCKER_HOSTS. On a remote engine, host folders cannot be bind-mounted, so the workspace lives
in a per-trial volume (copied in through the API, and copied back to `host_workspace` after every exec).

    sweep_leftovers(client)
    sb = DockerSandbox(image_name("pithtrain"), workspace_src, engine=client, read_only=True,
                       proxy_socket=Path("/tmp/ate-proxy/proxy.sock"), run_id=run_id)
    try:
        r = sb.exec("python -c 'import pithtrain'", timeout=60)
    finally:
        sb.close()
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import docker.types

from bench.harness.core import WORKSPACE, ExecResult
from bench.harness.gpus import GpuPool

PROXY_DIR = "/ate/proxy"
PROXY_PORT = 47800
EXEC_DIR = "/ate/exec"
KILL_AFTER_S = 5  # `timeout --kill-after`
HOST_GRACE_S = 15  # host-side deadline = timeout + KILL_AFTER_S + this
LABEL = "ate-bench"

FORWARDER = r'''"""TCP 127.0.0.1:PORT -> unix socket relay (the container has no network; the proxy is on the host)."""
import asyncio
import sys

PORT, SOCK = int(sys.argv[1]), sys.argv[2]


async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (OSError, asyncio.CancelledError):
        pass


async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_unix_connection(SOCK)
    except OSError as e:
        print(f"forwarder: cannot reach {SOCK}: {e}", file=sys.stderr, flush=True)
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
    for w in (uw, cw):
        w.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", PORT)
    async with server:
        await server.serve_forever()


asyncio.run(main())
'''


# ------------------------------------------------------------------------------------ engines


def connect(engine: docker.DockerClient | str | None = None, timeout: int = 120) -> docker.DockerClient:
    """A client for `engine`: an existing client, a URL (unix://, tcp://, ssh://), or None (DOCKER_HOST/local)."""
    if isinstance(engine, docker.DockerClient):
        return engine
    if engine is None:
        return docker.from_env(timeout=timeout)
    return docker.DockerClient(base_url=engine, timeout=timeout, use_ssh_client=engine.startswith("ssh://"))


def engines_from_env() -> list[docker.DockerClient]:
    """One client per engine in ATE_DOCKER_HOSTS (comma-separated URLs); default: the local engine."""
    urls = [u.strip() for u in os.environ.get("ATE_DOCKER_HOSTS", "").split(",") if u.strip()]
    return [connect(u) for u in urls] if urls else [connect(None)]


def is_local_engine(client: docker.DockerClient) -> bool:
    """Whether the engine shares this host's filesystem (a unix socket), so host folders can be bind-mounted."""
    return client.api.base_url.startswith(("http+docker://localhost", "http+docker://localunixsocket"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_leftovers(client: docker.DockerClient) -> int:
    """Remove containers and volumes labelled ate-bench by a harness on this host whose pid is dead.
    Call at start-up. Returns how many containers were removed."""
    host, n = socket.gethostname(), 0
    for c in client.containers.list(all=True, filters={"label": f"{LABEL}=1"}):
        labels = c.labels
        if labels.get(f"{LABEL}.host") != host or _pid_alive(int(labels.get(f"{LABEL}.pid", "0") or 0)):
            continue
        try:
            c.remove(force=True)
            n += 1
        except docker.errors.NotFound:
            pass
    for v in client.volumes.list(filters={"label": f"{LABEL}=1"}):
        labels = v.attrs.get("Labels") or {}
        if labels.get(f"{LABEL}.host") == host and not _pid_alive(int(labels.get(f"{LABEL}.pid", "0") or 0)):
            try:
                v.remove(force=True)
            except docker.errors.APIError:
                pass  # still used by a container being removed
    return n


# ------------------------------------------------------------------------------------ GPUs


_claims: dict[tuple[str, str], str] = {}  # (engine, GPU UUID) -> container name: the "one trial per GPU" guard
_claims_lock = threading.Lock()


# ------------------------------------------------------------------------------------ the sandbox


def _tar(entries: list[tuple[Path | bytes, str]]) -> bytes:
    """A tar of (host path or file bytes, archive name) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for src, name in entries:
            if isinstance(src, bytes):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(src), 0o755, int(time.time())
                tf.addfile(info, io.BytesIO(src))
            else:
                tf.add(str(src), arcname=name)
    return buf.getvalue()


class DockerSandbox:
    """core.Sandbox in a container. `image`: e.g. images.image_name("pithtrain"). `workspace_src`: folder
    copied to WORKSPACE (None: empty). `gpus`: GPU UUIDs (take them from a GpuPool and pass `gpu_pool` to
    have close() give them back). `proxy_socket`: host path of the accounting proxy's unix socket (local
    engines only); then `api_base_in_sandbox` is the URL to give the agent. `bind_workspace` (default:
    whether the engine is local) picks a bind mount of host_workspace over a per-trial volume. Agent and harness commands
    both run as root in the container: a read-only workspace mount stops both, so call
    set_read_only(False) before the verifier writes there (it recreates the container; copy_in into the
    workspace always works, from the host side)."""

    kind = "docker"

    def __init__(
        self, image: str, workspace_src: Path | None, *, engine: docker.DockerClient | str | None = None,
        read_only: bool = False, cpus: float | None = None, memory_gb: float | None = None,
        pids_limit: int = 4096, gpus: list[str] | None = None, gpu_pool: GpuPool | None = None,
        proxy_socket: Path | None = None, run_id: str = "adhoc", shm_gb: float = 1.0,
        network_mode: str = "none", bind_workspace: bool | None = None,
    ) -> None:
        self.client = connect(engine)
        self.image = image
        self.read_only = read_only
        self.gpus, self._gpu_pool = list(gpus or []), gpu_pool
        self.workspace = WORKSPACE
        self.harness_dir = "/ate/harness"  # container filesystem, outside the workspace mount
        self.agent_env: dict[str, str] = {}  # added to every agent command's environment (e.g. the meter)
        self._closed = False
        self._container = None
        self._volume = None
        self._bind = is_local_engine(self.client) if bind_workspace is None else bind_workspace
        self.name = f"ate-{run_id[:40]}-{uuid.uuid4().hex[:8]}".replace("/", "-").replace(":", "-")
        self._engine_key = self.client.api.base_url
        self._claim_gpus()
        self._root = Path(tempfile.mkdtemp(prefix="ate-docker-"))
        try:
            ws = self._root / "workspace"
            if workspace_src is not None:
                shutil.copytree(workspace_src, ws, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                ws.mkdir()
            self.host_workspace = ws
            labels = {LABEL: "1", f"{LABEL}.run": run_id, f"{LABEL}.pid": str(os.getpid()),
                      f"{LABEL}.host": socket.gethostname()}
            self._labels = labels
            mounts = []
            self.api_base_in_sandbox = None
            if proxy_socket is not None:
                if not self._bind:
                    raise ValueError("proxy_socket needs a local engine (a unix-socket path cannot cross hosts)")
                proxy_socket = Path(proxy_socket)
                mounts.append(docker.types.Mount(PROXY_DIR, str(proxy_socket.parent), type="bind", read_only=True))
                self.api_base_in_sandbox = f"http://127.0.0.1:{PROXY_PORT}"
                command = ["python3", "/ate/forwarder.py", str(PROXY_PORT), f"{PROXY_DIR}/{proxy_socket.name}"]
            else:
                command = ["sleep", "infinity"]
            if not self._bind:
                self._volume = self.client.volumes.create(f"{self.name}-ws", labels=labels)
                self._fill_volume([(ws, ".")])
            self._create_kwargs = dict(
                image=image, command=command, name=self.name, labels=labels, hostname="ate",
                working_dir=WORKSPACE, network_mode=network_mode, init=True, detach=True,
                nano_cpus=int(cpus * 1e9) if cpus else None,
                mem_limit=f"{int(memory_gb * 1024)}m" if memory_gb else None,
                memswap_limit=f"{int(memory_gb * 1024)}m" if memory_gb else None,
                pids_limit=pids_limit, shm_size=f"{int(shm_gb * 1024)}m",
                security_opt=["no-new-privileges"],
                device_requests=[docker.types.DeviceRequest(device_ids=self.gpus, capabilities=[["gpu"]])]
                if self.gpus else None,
            )
            self._extra_mounts = mounts
            self._start()
        except BaseException:
            self.close()
            raise
        ro = "read-only mount (enforced by the kernel)" if read_only else "writable mount"
        self.isolation_note = (
            f"docker sandbox: container per trial from {image}, network {network_mode}, workspace {ro}, "
            f"limits cpus={cpus} memory={memory_gb}GB pids={pids_limit}, GPUs {self.gpus or 'none'}; "
            f"same kernel as the host (no VM)."
        )

    def _claim_gpus(self) -> None:
        with _claims_lock:
            held = [u for u in self.gpus if (self._engine_key, u) in _claims]
            if held:
                raise ValueError(f"GPU {held[0]} is already used by live sandbox {_claims[(self._engine_key, held[0])]}")
            for u in self.gpus:
                _claims[(self._engine_key, u)] = self.name

    def _mounts(self) -> list[docker.types.Mount]:
        if self._bind:
            ws = docker.types.Mount(WORKSPACE, str(self.host_workspace), type="bind", read_only=self.read_only)
        else:
            ws = docker.types.Mount(WORKSPACE, self._volume.name, type="volume", read_only=self.read_only)
        return [ws, *self._extra_mounts]

    def _start(self) -> None:
        try:
            c = self.client.containers.create(mounts=self._mounts(), **self._create_kwargs)
        except docker.errors.ImageNotFound:
            raise RuntimeError(f"image {self.image} not found on engine {self._engine_key} "
                               "(build it: python -m bench.harness.images build)") from None
        self._container = c
        c.put_archive("/", _tar([(FORWARDER.encode(), "ate/forwarder.py")]))
        c.start()

    # ------------------------------------------------------------------------------------ exec

    def exec(
        self, cmd: str, *, timeout: float, env: dict[str, str] | None = None, workdir: str | None = None,
        as_agent: bool = True,
    ) -> ExecResult:
        """Runs detached under `timeout --kill-after` with output to a file, polled from the host: a silent
        hour-long command never trips an HTTP read timeout, and if `timeout` fails to end it the host
        kills its process group at the host-side deadline. `as_agent` makes no difference here (both run
        as root in the container; the mount mode is the enforcement)."""
        if self._closed or self._container is None:
            raise RuntimeError("sandbox is closed")
        api, cid = self.client.api, self._container.id
        tag = uuid.uuid4().hex[:12]
        out, pidf = f"{EXEC_DIR}/{tag}.out", f"{EXEC_DIR}/{tag}.pid"
        wrapper = (f'mkdir -p {EXEC_DIR}; echo $$ > {pidf}; exec timeout --kill-after={KILL_AFTER_S} {timeout:.3f} '
                   f'bash -c "$0" > {out} 2>&1 </dev/null')
        t0 = time.monotonic()
        exec_id = api.exec_create(cid, ["bash", "-c", wrapper, cmd],
                                  environment={**(self.agent_env if as_agent else {}), **(env or {})},
                                  workdir=self._abs(workdir or WORKSPACE), stdout=False, stderr=False)["Id"]
        api.exec_start(exec_id, detach=True)
        deadline = t0 + timeout + KILL_AFTER_S + HOST_GRACE_S
        delay, info, killed = 0.01, {}, False
        while True:
            info = api.exec_inspect(exec_id)
            if not info.get("Running") and (info.get("ExitCode") is not None or time.monotonic() - t0 > 5):
                break
            if time.monotonic() > deadline:
                if killed:
                    break
                self._kill_exec(pidf)
                killed, deadline = True, time.monotonic() + 10
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        duration = time.monotonic() - t0
        code = info.get("ExitCode")
        code = -1 if code is None or info.get("Running") else code
        timed_out = killed or (code in (124, 137) and duration >= timeout)
        output = self._read(out)
        self._fire(f"rm -f {out} {pidf}")
        if not self._bind:
            self._pull_workspace()
        return ExecResult(exit_code=124 if timed_out else code, output=output, duration_s=duration,
                          timed_out=timed_out)

    def _kill_exec(self, pidf: str) -> None:
        """Host-side deadline passed: kill the command's process group (timeout(1) leads it)."""
        try:
            self._fire(f"kill -KILL -- -$(cat {pidf}) 2>/dev/null; kill -KILL $(cat {pidf}) 2>/dev/null")
        except docker.errors.APIError:
            pass

    def _fire(self, cmd: str) -> None:
        try:
            eid = self.client.api.exec_create(self._container.id, ["bash", "-c", cmd])["Id"]
            self.client.api.exec_start(eid, detach=True)
        except docker.errors.APIError:
            pass

    def _read(self, path: str) -> str:
        try:
            stream, _ = self.client.api.get_archive(self._container.id, path)
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tf:
                member = tf.next()
                f = tf.extractfile(member) if member else None
                return f.read().decode(errors="replace") if f else ""
        except docker.errors.NotFound:
            return ""

    # ------------------------------------------------------------------------------------ files

    def _fill_volume(self, entries: list[tuple[Path, str]], dst: str = WORKSPACE) -> None:
        """Write into the workspace volume through a throwaway container (works while it is mounted read-only)."""
        helper = self.client.containers.create(
            self.image, ["true"], labels=self._labels, network_mode="none",
            mounts=[docker.types.Mount(WORKSPACE, self._volume.name, type="volume")],
        )
        try:
            helper.put_archive(dst, _tar(entries))
        finally:
            helper.remove(force=True)

    def _pull_workspace(self) -> None:
        """Remote engine: mirror the workspace volume into host_workspace."""
        stream, _ = self.client.api.get_archive(self._container.id, WORKSPACE + "/.")
        shutil.rmtree(self.host_workspace, ignore_errors=True)
        self.host_workspace.mkdir()
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tf:
            tf.extractall(self.host_workspace, filter="tar")

    @staticmethod
    def _abs(path: str) -> str:
        """Relative sandbox paths are relative to the workspace."""
        return path if path.startswith("/") else f"{WORKSPACE}/{path}"

    def copy_in(self, src: Path, dst: str) -> None:
        src = Path(src)
        dst = self._abs(dst)
        if dst == WORKSPACE or dst.startswith(WORKSPACE + "/"):
            rel = dst[len(WORKSPACE):].lstrip("/")
            target = self.host_workspace / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
            if not self._bind:
                self._fill_volume([(src, rel or ".")])
            return
        self._container.put_archive("/", _tar([(src, dst.lstrip("/"))]))

    def stop_agent_processes(self) -> None:
        """Kill the process group of every command started so far (and their background jobs), so the
        verifier sees settled files. `timeout` leads its own process group, whose id is in the .pid file."""
        if self._container is not None and not self._closed:
            # $PPID is this command's own `timeout` (its group leader): spare it, kill the rest.
            self.exec(f'for f in {EXEC_DIR}/*.pid; do p=$(cat "$f" 2>/dev/null); '
                      f'[ -n "$p" ] && [ "$p" != "$PPID" ] && kill -9 -- -"$p" 2>/dev/null; done; true',
                      timeout=30, as_agent=False)

    def set_read_only(self, read_only: bool) -> None:
        """Mount modes are fixed at creation, so a change recreates the container: processes started by
        earlier exec calls end and the container's files outside the workspace are reset."""
        if read_only == self.read_only:
            return
        self.read_only = read_only
        self._remove_container()
        self._start()

    # ------------------------------------------------------------------------------------ cleanup

    def _remove_container(self) -> None:
        if self._container is not None:
            try:
                self._container.remove(force=True)
            except docker.errors.NotFound:
                pass
            self._container = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._remove_container()
            if self._volume is not None:
                self._volume.remove(force=True)
        finally:
            with _claims_lock:
                for u in self.gpus:
                    if _claims.get((self._engine_key, u)) == self.name:
                        del _claims[(self._engine_key, u)]
            if self._gpu_pool is not None:
                self._gpu_pool.release(self.gpus)
            if getattr(self, "_root", None) is not None:
                shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> DockerSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
