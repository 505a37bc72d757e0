"""What the feature tasks' probes (tests/<framework>/probe.py) share: child processes, training-run files, and each
framework's setup. The harness copies this file beside every task's hidden tests; a probe run as a script puts that
folder on sys.path itself.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def child_env(root: Path | None = None, **extra: str) -> dict:
    """os.environ for a child process, less the rendezvous of this one's process group (its port is taken), with
    `root` first on PYTHONPATH and one thread."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS} | {"OMP_NUM_THREADS": "1", **extra}
    return env | ({"PYTHONPATH": str(root)} if root is not None else {})


def rows(path: Path, missing_ok: bool = False) -> list:
    """The rows of a metrics.jsonl (missing_ok: [] when the run wrote none, for a caller that reports its log)."""
    if missing_ok and not path.is_file():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def write_toml(raw: dict, path: Path) -> Path:
    """Tables of scalars and lists as TOML (JSON's scalars and lists are TOML's)."""
    path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items()) + "\n"
                            for t, kv in raw.items()))  # fmt: skip
    return path


def small_batch(text: str, model_lines: str = "") -> str:
    """An ate_run TOML at the verifiers' batch of 4 x 64 tokens, `model_lines` added to its [model] table."""
    for key, value in (("micro_batch_size", 4), ("global_batch_size", 4), ("seq_length", 64)):
        text = re.sub(rf"^{key} = \d+", f"{key} = {value}", text, count=1, flags=re.M)
    return text.replace("[model]\n", f"[model]\n{model_lines}", 1)


def dump_pristine(script: str, args: list, base: Path, out: Path, cwd: Path) -> dict:
    """`script dump *args` with the pristine framework first on PYTHONPATH; -> what it saved at `out`."""
    r = subprocess.run([sys.executable, script, "dump", *map(str, args)], cwd=cwd, env=child_env(base),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    if r.returncode != 0:  # the pristine framework failing is a bug of the verifier, not the agent's
        raise RuntimeError(f"verifier bug: probe.py dump of the pristine framework: {(r.stdout + r.stderr)[-2000:]}")
    return torch.load(out)


# ---- Megatron-Core: the workspace's launch entry ate_run/pretrain_gpt.py ----


def megatron_entry():
    """The workspace's launch entry, with Megatron's world of one and (without a GPU) its CPU emulation on."""
    import ate_run.pretrain_gpt as pg

    pg.init_world(DEVICE)
    if DEVICE == "cuda":  # Megatron's layers draw their init from its CUDA RNG tracker, which needs its states
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    if DEVICE == "cpu" and not pg.cpu_emulation_active():
        pg.patch_cuda_for_cpu()
        pg.CudaOnCpu().__enter__()  # for the rest of this thread, as build_model does
    pg.fix_mcore_without_te()
    return pg


def megatron_tiny(overrides: dict | None = None) -> dict:
    """The pristine ate_run/tiny.toml resolved by the workspace's launch entry on DEVICE, `overrides` merged."""
    pg = megatron_entry()
    return pg.load_config(Path(os.environ["ATE_BASE"]) / "ate_run" / "tiny.toml", {"device": DEVICE, **(overrides or {})})


def megatron_train(ws: Path, config: Path, out: Path, steps: int, timeout: int, env: dict | None = None):
    """`python -m ate_run.pretrain_gpt` of the workspace on `config` for `steps` steps on DEVICE."""
    cmd = [sys.executable, "-m", "ate_run.pretrain_gpt", "--config", str(config), "--train-iters", str(steps),
           "--out", str(out), "--device", DEVICE, "--no-save-optim"]  # fmt: skip
    return subprocess.run(cmd, cwd=ws, env=env or child_env(ws), capture_output=True, text=True, timeout=timeout)


# ---- TorchTitan ----


def torchtitan_cpu_histc() -> None:
    """torchtitan_probe.cpu_histc on DEVICE (integer torch.histc on CPU, for TorchTitan's MoE)."""
    from torchtitan_probe import cpu_histc

    cpu_histc(DEVICE)


# ---- PithTrain ----


def pithtrain_dump(root: Path, out: Path) -> dict:
    """Both tiny models of the framework at `root` with the feature off (dump.py beside the tests, in a process of
    its own): shapes, logits, losses, expert load and gradients."""
    env = child_env(root)
    configs = Path(os.environ["ATE_BASE"]) / "configs"
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("dump.py")), str(configs), str(out)],
                       cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, f"{root}: {(r.stdout + r.stderr)[-2000:]}"
    return torch.load(out)


def pithtrain_heldout(raw: dict, run: Path) -> tuple:
    """(cfg, held-out loss of the run's model at init, from its final checkpoint, its parameter names)."""
    from pithtrain import checkpoint as ckpt
    from pithtrain.config import build_config, model_classes
    from pithtrain.data import TokenShards, builtin_dataset

    cfg = build_config(raw)
    torch.manual_seed(0)
    model = model_classes(cfg.family)[1](cfg.model)
    model.init_weights()
    model.eval()
    x, y = TokenShards(builtin_dataset()).batch(range(8), cfg.train.seq_len, "val")
    with torch.no_grad():
        before = model(x, labels=y).loss.item()
        ckpt.load_model_weights(ckpt.latest_checkpoint(run), model)
        after = model(x, labels=y).loss.item()
    return cfg, before, after, {n for n, _ in model.named_parameters()}
