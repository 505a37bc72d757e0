"""Offline image builds for the docker sandbox (no image registry is reachable on our machines).

    python -m bench.harness.images build [--base NAME] [--framework pithtrain] [--skip-torch]

(a) `ate-base:bookworm`: debootstrap (minbase + python3, venv, pip, git, CA certificates, procps) piped
    into `docker import`; skipped when the image exists. `--base NAME` uses any local image instead (e.g. a
    CUDA PyTorch image loaded with `docker load`; add `--skip-torch` to keep its torch).
(b) `ate-<framework>:<hash>` (also tagged `:latest`) for pithtrain, torchtitan and megatron, built FROM the
    base with `docker build` on the host network: a venv at /opt/venv with CPU torch (wheel downloaded once on
    the host, hard-linked into each build context) and the test/runtime packages at the host venv's versions
    (that layer is shared by the three builds), then the framework's own pinned extras (`extras`); the Claude Code and Codex native binaries when
    they are installed on the host (npm). The framework package itself is not installed: the agent's
    workspace holds it (PYTHONPATH=/workspace). The hash covers every build input, so an unchanged build
    is skipped. A two-stage Dockerfile keeps the torch wheel out of the final layers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

BASE_IMAGE = "ate-base:bookworm"
DEBIAN_MIRROR = os.environ.get("ATE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = "python3,python3-venv,python3-pip,git,ca-certificates,procps"
TORCH = "torch==2.13.0"
PACKAGES = ("numpy", "tokenizers", "safetensors", "pytest", "transformers", "pyarrow")
FRAMEWORKS = ("pithtrain", "torchtitan", "megatron")
REPO = Path(__file__).resolve().parents[2]


def extras(framework: str) -> list[str]:
    """Pinned packages a framework needs beyond the common venv (its package itself stays in the workspace):
    adapters/<framework>/wheels.txt without the framework's own line."""
    path = REPO / "adapters" / framework / "wheels.txt"
    if not path.is_file():
        return []
    own = {"torchtitan": "torchtitan==", "megatron": "megatron-core=="}.get(framework, "\0")
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(own)]
CACHE = Path(os.environ.get("ATE_IMAGE_CACHE", "~/.cache/ate-bench/images")).expanduser()
IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_t0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[images {time.monotonic() - _t0:6.1f}s] {msg}", flush=True)


class BuildError(Exception):
    pass


def image_name(framework: str) -> str:
    """The image a DockerSandbox uses for `framework` (the newest build)."""
    return f"ate-{framework}:latest"


def image_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


# ------------------------------------------------------------------------------------ base image


def build_base(client: docker.DockerClient, name: str = BASE_IMAGE) -> None:
    """debootstrap a minimal Debian bookworm and `docker import` it (skip when it exists)."""
    if image_exists(client, name):
        log(f"base {name}: exists, skipped")
        return
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise BuildError("building the base image needs root and debootstrap (apt-get install debootstrap)")
    t = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ate-debootstrap-") as d:
        root = Path(d) / "rootfs"
        log(f"base {name}: debootstrap bookworm from {DEBIAN_MIRROR}")
        proc = subprocess.Popen(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root),
             DEBIAN_MIRROR],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        seen: set[str] = set()
        tail: list[str] = []
        for line in proc.stdout:  # show each phase once, not every package
            tail = (tail + [line.rstrip()])[-20:]
            verb = line.split()[1] if line.startswith("I: ") and len(line.split()) > 1 else ""
            if verb and verb not in seen:
                log(f"  {line.strip()}")
                seen.add(verb)
        if proc.wait() != 0:
            raise BuildError("debootstrap failed:\n" + "\n".join(tail))
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        log(f"base {name}: rootfs ready ({time.monotonic() - t:.0f}s), importing")
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
        client.api.import_image(
            src=tar.stdout, repository=repo, tag=tag, stream_src=True,
            changes=["ENV LANG=C.UTF-8", "CMD [\"/bin/bash\"]"],
        )
        if tar.wait() != 0:
            raise BuildError("tar of the debootstrap rootfs failed")
    size = client.images.get(name).attrs["Size"] / 1e6
    log(f"base {name}: built in {time.monotonic() - t:.0f}s ({size:.0f} MB)")


# ------------------------------------------------------------------------------------ CLIs


def find_clis() -> dict[str, Path]:
    """Native Claude Code / Codex files from the host's npm global root: {dest under the image: source}."""
    out: dict[str, Path] = {}
    npm = shutil.which("npm")
    if not npm:
        log("CLIs: npm not found, skipping claude and codex")
        return out
    root = Path(subprocess.run([npm, "root", "-g"], capture_output=True, text=True).stdout.strip())
    claude = sorted(root.glob("@anthropic-ai/claude-code/node_modules/@anthropic-ai/claude-code-linux-x64/claude"))
    claude = claude or sorted(root.glob("@anthropic-ai/claude-code-linux-x64/claude"))
    if claude:
        out["usr/local/bin/claude"] = claude[0]
    else:
        log("CLIs: Claude Code not installed on the host (npm install -g @anthropic-ai/claude-code), skipped")
    vendor = sorted(root.glob("@openai/codex/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl"))
    vendor = vendor or sorted(root.glob("@openai/codex/vendor/x86_64-unknown-linux-musl"))
    if vendor and (vendor[0] / "bin" / "codex").is_file():
        for p in sorted(vendor[0].rglob("*")):  # codex finds its helpers relative to its own path
            rel = p.relative_to(vendor[0])
            if p.is_file() and rel.parts[:2] != ("codex-resources", "voice"):
                out[f"opt/codex/{rel}"] = p
    else:
        log("CLIs: Codex not installed on the host (npm install -g @openai/codex), skipped")
    return out


def _place(src: Path, dst: Path) -> None:
    """Hard-link into the build context when possible (the CLIs are hundreds of MB), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------ framework image


def _pins() -> list[str]:
    """The host venv's versions of the image packages, so host and image test the same code."""
    pins = []
    for pkg in PACKAGES:
        try:
            pins.append(f"{pkg}=={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(pkg)
    return pins


def dockerfile(base: str, framework: str, *, ca: bool, torch: bool, clis: dict[str, Path]) -> str:
    pins = " ".join(_pins())
    more = extras(framework)  # a later layer: the common venv layer above is shared by every framework's build
    extra_lines = (f"RUN /opt/venv/bin/pip install -q --no-deps {' '.join(more)} \\\n"
                   f" && find /opt/venv -name __pycache__ -prune -exec rm -rf {{}} +\n") if more else ""
    ca_lines = (
        "COPY ca.crt /usr/local/share/ca-certificates/ate-egress.crt\nRUN update-ca-certificates >/dev/null\n"
        if ca else ""
    )
    torch_install = "/ctx/wheels/torch-*.whl " if torch else ""
    venv_flags = "" if torch else "--system-site-packages "
    cli_lines = ""
    if clis:
        cli_lines = "COPY cli/ /\n"
        if any(k.startswith("opt/codex/") for k in clis):
            cli_lines += ("RUN ln -sf /opt/codex/bin/codex /usr/local/bin/codex && "
                          "ln -sf /opt/codex/codex-path/rg /usr/local/bin/rg\n")
    return f"""\
# generated by bench/harness/images.py
FROM {base} AS venv
{ca_lines}ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY wheels/ /ctx/wheels/
RUN python3 -m venv {venv_flags}/opt/venv && /opt/venv/bin/pip install -q {torch_install}{pins} \\
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {{}} +
{extra_lines}LABEL ate-bench.stage=venv-cache

FROM {base}
{ca_lines}COPY --from=venv /opt/venv /opt/venv
{cli_lines}ENV PATH={IMAGE_PATH} PYTHONPATH=/workspace LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
# Agents' login shells (codex runs `bash -lc`) reset PATH from /etc/profile: keep the venv first there too.
RUN ln -sf /opt/venv/bin/python /usr/local/bin/python \\
 && echo 'export PATH={IMAGE_PATH}' > /etc/profile.d/ate-venv.sh
LABEL ate-bench.framework={framework}
WORKDIR /workspace
"""


def build_framework(client: docker.DockerClient, framework: str, base: str, *, torch: bool = True) -> str:
    """Build `ate-<framework>:<hash>` (+ `:latest`) from `base`; skipped when that hash exists."""
    if framework not in FRAMEWORKS:
        raise BuildError(f"unknown framework {framework!r} (known: {', '.join(FRAMEWORKS)})")
    if not image_exists(client, base):
        raise BuildError(f"base image {base} not found (build it, or `docker load` it)")
    t = time.monotonic()
    ctx = CACHE / framework
    (ctx / "wheels").mkdir(parents=True, exist_ok=True)
    shared = CACHE / "wheels"  # one download for every framework's context (hard-linked in)
    pattern = f"torch-{TORCH.split('==')[1]}*.whl"
    wheels = sorted(shared.glob(pattern)) or sorted(CACHE.glob(f"*/wheels/{pattern}"))  # or an older build's
    if torch and not wheels:
        log(f"{framework}: pip download {TORCH} into {shared}")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", TORCH, "--no-deps", "-d",
                            str(shared)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"pip download {TORCH} failed: {r.stderr.strip().splitlines()[-1:]}")
        wheels = sorted(shared.glob(pattern))
    if torch and not (ctx / "wheels" / wheels[0].name).exists():
        _place(wheels[0], ctx / "wheels" / wheels[0].name)
    for old in (ctx / "wheels").glob("*.whl"):  # only the wanted wheel travels in the context
        if torch and old.name.startswith(f"torch-{TORCH.split('==')[1]}"):
            continue
        old.unlink()
    ca_src = os.environ.get("SSL_CERT_FILE")
    ca = bool(ca_src and Path(ca_src).is_file())
    if ca:
        shutil.copyfile(ca_src, ctx / "ca.crt")
    elif (ctx / "ca.crt").exists():
        (ctx / "ca.crt").unlink()
    clis = find_clis()
    if (ctx / "cli").exists():
        shutil.rmtree(ctx / "cli")
    for dst, src in clis.items():
        _place(src, ctx / "cli" / dst)
    text = dockerfile(base, framework, ca=ca, torch=torch, clis=clis)
    (ctx / "Dockerfile").write_text(text)

    h = hashlib.sha256(text.encode())
    h.update(client.images.get(base).id.encode())
    for p in sorted(ctx.rglob("*")):  # cheap: names, sizes, mtimes (the CA bundle by content)
        if p.is_file() and p.name not in ("Dockerfile", "ca.crt"):
            st = p.stat()
            h.update(f"{p.relative_to(ctx)}:{st.st_size}:{int(st.st_mtime)}".encode())
    if ca:
        h.update((ctx / "ca.crt").read_bytes())
    tag = h.hexdigest()[:12]
    name = f"ate-{framework}:{tag}"
    if image_exists(client, name):
        client.images.get(name).tag(f"ate-{framework}", "latest")
        log(f"{framework}: {name} exists, skipped (tagged {image_name(framework)})")
        return name

    log(f"{framework}: docker build {name} (context {_du(ctx) / 1e6:.0f} MB, CLIs: "
        f"{', '.join(sorted({'claude' if 'claude' in k else 'codex' for k in clis})) or 'none'})")
    last = ""
    for chunk in client.api.build(path=str(ctx), tag=name, network_mode="host", rm=True, forcerm=True,
                                  decode=True, labels={"ate-bench.hash": tag}):
        if "error" in chunk:
            raise BuildError(f"docker build failed: {chunk['error'].strip()} (last step: {last})")
        line = chunk.get("stream", "").strip()
        if line.startswith("Step "):
            last = line
            log(f"  {line[:140]}")
    image = client.images.get(name)
    image.tag(f"ate-{framework}", "latest")
    for old in client.images.list(name=f"ate-{framework}"):  # earlier builds: their venv layers are GBs
        if old.id != image.id:
            try:
                for old_tag in old.tags:
                    client.images.remove(old_tag)
                log(f"{framework}: removed the older build {', '.join(old.tags)}")
            except docker.errors.APIError as e:
                log(f"{framework}: kept the older build {old.short_id} ({e.explanation})")
    size = image.attrs["Size"] / 1e9
    log(f"{framework}: built {name} in {time.monotonic() - t:.0f}s ({size:.2f} GB), tagged {image_name(framework)}")
    check_image(client, name)
    return name


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_image(client: docker.DockerClient, name: str) -> None:
    """Smoke-test an image: python with torch, and the CLIs it carries."""
    script = (
        "python -c 'import torch, numpy, transformers; print(\"torch\", torch.__version__)'; "
        "for c in claude codex; do if command -v $c >/dev/null; then echo \"$c: $($c --version 2>&1 | tail -1)\"; "
        "else echo \"$c: not in image\"; fi; done"
    )
    out = client.containers.run(name, ["bash", "-c", script], network_mode="none", remove=True,
                                stderr=True)
    for line in out.decode().strip().splitlines():
        log(f"  check: {line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.harness.images", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the base image and the framework images (skips what exists)")
    b.add_argument("--base", default=None, help=f"use this local image as the base instead of {BASE_IMAGE}")
    b.add_argument("--framework", action="append", choices=FRAMEWORKS,
                   help="framework image(s) to build (default: all)")
    b.add_argument("--skip-torch", action="store_true", help="keep the base image's torch (e.g. a CUDA image)")
    b.add_argument("--docker-host", default=None, help="engine URL (default: DOCKER_HOST or the local socket)")
    args = ap.parse_args(argv)
    try:
        client = (docker.DockerClient(base_url=args.docker_host, timeout=600) if args.docker_host
                  else docker.from_env(timeout=600))
        client.ping()
    except docker.errors.DockerException as e:
        print(f"images: no Docker engine reachable: {e}", file=sys.stderr)
        return 1
    try:
        base = args.base or BASE_IMAGE
        if args.base is None:
            build_base(client)
        for fw in args.framework or FRAMEWORKS:
            build_framework(client, fw, base, torch=not args.skip_torch)
    except (BuildError, docker.errors.DockerException) as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
