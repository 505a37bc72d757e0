"""Sandbox backends: LocalSandbox everywhere; DockerSandbox (marker `docker`) where an engine runs.

Docker tests fail, rather than skip, when CI is set and no engine or image is there (.ci/docker-setup
provides both)."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.harness.core import WORKSPACE
from bench.harness.sandbox_local import LocalSandbox

REPO = Path(__file__).resolve().parents[1]
PITHTRAIN_PKG = REPO / "framework" / "pithtrain"


def _live_cmdlines(marker: str) -> list[str]:
    """Command lines of live (non-zombie) processes containing `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and state != "Z" and entry != str(os.getpid()):
            found.append(cmd)
    return found


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    (d / "hello.txt").write_text("hi\n")
    return d


# ------------------------------------------------------------------------------------ local


@pytest.mark.timeout(60)
def test_local_exec_basics(ws: Path) -> None:
    with LocalSandbox(ws) as sb:
        assert sb.kind == "local" and sb.host_workspace == Path(sb.workspace) and "WEAK" in sb.isolation_note
        r = sb.exec("cat hello.txt; echo err >&2; exit 3", timeout=30)
        assert (r.exit_code, r.timed_out) == (3, False)
        assert "hi" in r.output and "err" in r.output
        sb.exec("mkdir -p sub", timeout=30)
        assert sb.exec("pwd", timeout=30, workdir=f"{WORKSPACE}/sub").output.strip() == f"{sb.workspace}/sub"
        assert (ws / "hello.txt").read_text() == "hi\n"  # the source is never touched
        sb.exec("echo changed > hello.txt", timeout=30)
        assert (ws / "hello.txt").read_text() == "hi\n"


@pytest.mark.timeout(60)
def test_local_timeout_kills_process_tree(ws: Path) -> None:
    with LocalSandbox(ws) as sb:
        t = time.monotonic()
        r = sb.exec("sleep 987.61 & setsid sleep 987.62 & sleep 987.63", timeout=1)
        assert r.timed_out and r.exit_code == 124
        assert time.monotonic() - t < 6
        time.sleep(0.2)
        assert _live_cmdlines("sleep 987.6") == []


@pytest.mark.timeout(60)
def test_local_rlimits(ws: Path) -> None:
    with LocalSandbox(ws, memory_gb=1, max_procs=300) as sb:
        r = sb.exec("ulimit -c; ulimit -u; ulimit -v", timeout=30)
        assert r.output.split() == ["0", "300", str(1 << 20)]
        r = sb.exec("python -c 'b = bytearray(2 << 30)'", timeout=60)
        assert r.exit_code != 0 and "MemoryError" in r.output


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="enforcement needs root (agent commands run as another user)")
def test_local_read_only_enforced_for_agent(ws: Path) -> None:
    with LocalSandbox(ws, read_only=True) as sb:
        r = sb.exec("id -u; touch new.txt; echo x >> hello.txt; chmod u+w hello.txt; rm -f hello.txt", timeout=30)
        assert r.output.split()[0] != "0"
        assert not (sb.host_workspace / "new.txt").exists()
        assert (sb.host_workspace / "hello.txt").read_text() == "hi\n"
        assert sb.exec("cat hello.txt", timeout=30).output == "hi\n"  # still readable
        assert sb.exec("touch by-harness.txt", timeout=30, as_agent=False).exit_code == 0
        sb.set_read_only(False)
        assert sb.exec("touch new.txt && echo x >> hello.txt", timeout=30).exit_code == 0
        sb.copy_in(ws / "hello.txt", f"{WORKSPACE}/copied/hello.txt")
        assert sb.exec("echo more >> copied/hello.txt", timeout=30).exit_code == 0
        sb.set_read_only(True)
        assert sb.exec("touch again.txt", timeout=30).exit_code != 0


@pytest.mark.timeout(60)
def test_local_env_is_clean(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATE_TEST_SECRET", "leak")
    with LocalSandbox(ws) as sb:
        r = sb.exec("env", timeout=30, env={"FOO": "bar"})
        env = dict(line.split("=", 1) for line in r.output.splitlines() if "=" in line)
        assert "ATE_TEST_SECRET" not in env and env["FOO"] == "bar"
        assert env["HOME"].startswith(str(sb.host_workspace.parent)) and env["LANG"]
        assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
        assert sb.exec("touch $HOME/x && touch $TMPDIR/y", timeout=30).exit_code == 0


@pytest.mark.timeout(60)
def test_local_close_removes_everything(ws: Path) -> None:
    sb = LocalSandbox(ws)
    r = sb.exec("sleep 987.71 >/dev/null 2>&1 & echo started", timeout=30)
    assert r.output.strip() == "started" and r.duration_s < 5  # a background job doesn't block exec
    assert _live_cmdlines("sleep 987.71")
    root = sb.host_workspace.parent
    sb.close()
    sb.close()  # idempotent
    assert not root.exists()
    time.sleep(0.2)
    assert _live_cmdlines("sleep 987.71") == []


@pytest.mark.timeout(120)
def test_local_pythonpath_shadows_installed_pithtrain(tmp_path: Path) -> None:
    import importlib.util

    installed = importlib.util.find_spec("pithtrain")
    assert installed is not None, "the harness venv should have pithtrain installed (scripts/setup)"
    src = tmp_path / "ws"
    shutil.copytree(PITHTRAIN_PKG, src / "pithtrain", ignore=shutil.ignore_patterns("__pycache__"))
    with LocalSandbox(src) as sb:
        sb.exec("echo 'SANDBOX_MARK = 42' >> pithtrain/__init__.py", timeout=30)
        r = sb.exec("cd /tmp && python -c 'import pithtrain; print(pithtrain.__file__, pithtrain.SANDBOX_MARK)'",
                    timeout=90)
        assert r.exit_code == 0, r.output
        path, mark = r.output.split()[-2:]
        assert path == f"{sb.workspace}/pithtrain/__init__.py" and mark == "42"
        assert Path(installed.origin).resolve() != Path(path).resolve()


# ------------------------------------------------------------------------------------ docker


def _engine():
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        return client, ""
    except Exception as e:  # noqa: BLE001 - any failure means "no engine"
        return None, f"{type(e).__name__}: {e}"


def _need(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {what} (run .ci/docker-setup)")
    pytest.skip(f"{what}; run .ci/docker-setup to enable the docker tests")


@pytest.fixture(scope="module")
def engine():
    client, err = _engine()
    if client is None:
        _need(f"no Docker engine is reachable ({err})")
    from bench.harness.sandbox_docker import sweep_leftovers

    sweep_leftovers(client)
    return client


@pytest.fixture(scope="module")
def base_image(engine) -> str:
    from bench.harness.images import BASE_IMAGE, image_exists

    if not image_exists(engine, BASE_IMAGE):
        _need(f"image {BASE_IMAGE} is missing")
    return BASE_IMAGE


@pytest.fixture
def dsb(engine, base_image, ws):
    """Factory of DockerSandboxes on the base image, all closed at the end."""
    from bench.harness.sandbox_docker import DockerSandbox

    made = []

    def make(**kw):
        sb = DockerSandbox(kw.pop("image", base_image), kw.pop("src", ws), engine=engine, run_id="pytest", **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_exec_labels_and_removal(engine, dsb) -> None:
    import docker.errors

    t = time.monotonic()
    sb = dsb()
    r = sb.exec("cat hello.txt; pwd; echo err >&2; exit 3", timeout=30)
    assert (r.exit_code, r.timed_out) == (3, False)
    assert r.output.split() == ["hi", WORKSPACE, "err"]
    assert sb.exec("echo $FOO", timeout=30, env={"FOO": "bar"}, workdir="/tmp").output == "bar\n"
    sb.exec("echo new > made.txt", timeout=30)
    assert (sb.host_workspace / "made.txt").read_text() == "new\n"
    labels = engine.containers.get(sb.name).labels
    assert labels["ate-bench"] == "1" and labels["ate-bench.run"] == "pytest"
    assert labels["ate-bench.pid"] == str(os.getpid())
    sb.close()
    overhead = time.monotonic() - t
    print(f"create + 3 execs + remove: {overhead:.2f}s")
    assert overhead < 5
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(sb.name)
    assert not sb.host_workspace.exists()
    sb.close()


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_timeout_kills(dsb) -> None:
    sb = dsb()
    t = time.monotonic()
    r = sb.exec("sleep 987 & sleep 988", timeout=2)
    assert r.timed_out and r.exit_code == 124 and time.monotonic() - t < 10
    assert "sleep 98" not in sb.exec("ps -eo args", timeout=30).output


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_host_side_deadline(dsb) -> None:
    """A command that survives `timeout` (it ignores TERM and KILL never reaches it: here we fake that by
    shrinking the grace periods) is still cut off by the host-side deadline."""
    import bench.harness.sandbox_docker as m

    sb = dsb()
    old = (m.KILL_AFTER_S, m.HOST_GRACE_S)
    m.KILL_AFTER_S, m.HOST_GRACE_S = 30, -29  # host deadline 1 s after timeout(1)'s TERM, long before its KILL
    try:
        t = time.monotonic()
        r = sb.exec("trap '' TERM; sleep 986", timeout=2)
    finally:
        m.KILL_AFTER_S, m.HOST_GRACE_S = old
    assert r.timed_out and time.monotonic() - t < 15
    assert "sleep 986" not in sb.exec("ps -eo args", timeout=30).output


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_network_none(dsb) -> None:
    sb = dsb()
    r = sb.exec("python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)\"", timeout=30)
    assert r.exit_code != 0 and ("unreachable" in r.output or "Errno" in r.output), r.output


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_read_only_mount(dsb, ws) -> None:
    sb = dsb(read_only=True)
    r = sb.exec("touch x", timeout=30)
    assert r.exit_code != 0 and "Read-only" in r.output
    assert sb.exec("touch /tmp/x && cat hello.txt", timeout=30).output == "hi\n"
    sb.copy_in(ws / "hello.txt", f"{WORKSPACE}/tests/hello.txt")  # the harness can still add files
    assert sb.exec("cat tests/hello.txt", timeout=30).output == "hi\n"
    sb.set_read_only(False)
    assert sb.exec("touch x", timeout=30).exit_code == 0


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_volume_workspace(dsb, ws) -> None:
    """The remote-engine path (no bind mounts): workspace in a volume, mirrored back to host_workspace."""
    sb = dsb(read_only=True, bind_workspace=False)
    assert sb.exec("touch x", timeout=30).exit_code != 0
    sb.copy_in(ws / "hello.txt", "tests/hello.txt")
    assert sb.exec("cat tests/hello.txt", timeout=30).output == "hi\n"
    sb.set_read_only(False)
    assert sb.exec("echo out > result.txt", timeout=30).exit_code == 0
    assert (sb.host_workspace / "result.txt").read_text() == "out\n"


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_pids_limit(engine, dsb) -> None:
    sb = dsb(pids_limit=64)
    assert engine.api.inspect_container(sb.name)["HostConfig"]["PidsLimit"] == 64
    script = (
        "import os, time\nok = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3); os._exit(0)\n    ok += 1\n"
        "print(ok)\n"
    )
    r = sb.exec(f"python3 -c '{script}'", timeout=60)
    assert int(r.output.split()[-1]) < 64, r.output


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_sweep_leftovers(engine, base_image, dsb) -> None:
    from bench.harness.sandbox_docker import sweep_leftovers

    live = dsb()
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = engine.containers.create(
        base_image, ["sleep", "infinity"], network_mode="none",
        labels={"ate-bench": "1", "ate-bench.run": "pytest", "ate-bench.pid": str(dead.pid),
                "ate-bench.host": socket.gethostname()},
    )
    assert sweep_leftovers(engine) >= 1
    names = {c.name for c in engine.containers.list(all=True, filters={"label": "ate-bench=1"})}
    assert orphan.name not in names and live.name in names


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = f"hello from the host via {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.docker
@pytest.mark.timeout(120)
def test_docker_proxy_forwarder(dsb) -> None:
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"ate-test-proxy-{os.getpid()}"
    d.mkdir(exist_ok=True)
    sock = d / "proxy.sock"
    sock.unlink(missing_ok=True)
    server = _UnixHTTPServer(str(sock), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sb = dsb(proxy_socket=sock)
        assert sb.api_base_in_sandbox and sb.api_base_in_sandbox.startswith("http://127.0.0.1:")
        script = (
            "import time, urllib.request\nfor i in range(50):\n    try:\n"
            f"        print(urllib.request.urlopen('{sb.api_base_in_sandbox}/v1/ping', timeout=5).read().decode()); break\n"
            "    except OSError:\n        time.sleep(0.1)\n"
        )
        r = sb.exec(f"python3 -c \"{script}\"", timeout=30)
        assert r.output.strip() == "hello from the host via /v1/ping", r.output
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_docker_pithtrain_image(engine, dsb, tmp_path) -> None:
    """The framework image: torch, the workspace's pithtrain on PYTHONPATH, the agent CLIs when built in."""
    from bench.harness.images import image_exists, image_name

    if not image_exists(engine, image_name("pithtrain")):
        _need(f"image {image_name('pithtrain')} is missing")
    src = tmp_path / "pt"
    shutil.copytree(PITHTRAIN_PKG, src / "pithtrain", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pithtrain" / "__init__.py").open("a").write("SANDBOX_MARK = 7\n")
    sb = dsb(image=image_name("pithtrain"), src=src)
    r = sb.exec("cd /tmp && python -c 'import torch, pithtrain; print(pithtrain.__file__, pithtrain.SANDBOX_MARK)'",
                timeout=120)
    assert r.output.split()[-2:] == [f"{WORKSPACE}/pithtrain/__init__.py", "7"], r.output
    for cli in ("claude", "codex"):
        if shutil.which(cli):  # built into the image when installed on the host
            v = sb.exec(f"{cli} --version", timeout=60)
            assert v.exit_code == 0 and v.output.strip(), v.output


def test_gpu_pool() -> None:
    from bench.harness.gpus import GpuPool

    pool = GpuPool(["GPU-a", "GPU-b", "GPU-c"])
    a = pool.acquire(2)
    with pytest.raises(TimeoutError):
        pool.acquire(2, timeout=0.1)
    threading.Timer(0.2, pool.release, args=(a,)).start()
    b = pool.acquire(3, timeout=5)
    assert sorted(b) == ["GPU-a", "GPU-b", "GPU-c"]
    with pytest.raises(ValueError):
        pool.acquire(4)
