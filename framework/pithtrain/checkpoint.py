"""Checkpoints through torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data position, RNG.

Layout: `<run_dir>/checkpoints/step_00000042/` holds a DCP checkpoint. It is written into a
`.tmp-step_...` folder and renamed only after every rank finished writing, so a crash during a
save leaves a temp folder that `latest_checkpoint` never picks (and the next save clears).
Model and optimizer go through `get_state_dict`/`set_state_dict` with the optimizer state flattened to one
key per parameter (`state.<param>.exp_avg`), and every key is the full model's parameter name: FSDP2 shards and
expert-parallel weights are DTensors with their global shape, and a pipeline rank saves its stages' parameters
under their own names (a rank holding two stages has them in a ModuleList, whose index is dropped from the keys).
So a checkpoint written under one layout (say ep=2 x pp=2) loads under any other, a single process included.
A weights-only checkpoint (`checkpoint.weights_only`) holds `model` and `step` alone: about a third of the bytes
with AdamW's two moments left out, enough for export, evaluation and `init_from`, refused for resuming.
"""

import contextlib
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

STEP_PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint folder, or None."""
    folder = checkpoint_dir(run_dir)
    done = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / ".metadata").exists())
    return done[-1] if done else None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _global_name(key: str) -> str:
    """Drop the stage index of a ModuleList of pipeline stages: `0.layers.3.x` -> `layers.3.x` (likewise after the
    `state.` / `param_groups.` prefix of flattened optimizer keys). Model keys never start with a digit."""
    return re.sub(r"^((?:state|param_groups)\.)?\d+\.", r"\1", key)


def _global_names(state: dict) -> dict:
    return {_global_name(k): v for k, v in state.items()}


def _local_names(state: dict, live: dict) -> dict:
    """Back from global names to this process's (possibly stage-indexed) keys."""
    names = {_global_name(k): k for k in live}
    return {names[k]: v for k, v in state.items()}


def is_weights_only(path) -> bool:
    """Whether a DCP checkpoint holds model weights alone (saved with `weights_only`): it has no optimizer keys."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return not any(k.startswith("optim.") for k in keys)


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, data_state: dict, keep: int = 2,
                    weights_only: bool = False) -> Path:
    folder = checkpoint_dir(run_dir)
    final = folder / f"{STEP_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{final.name}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if weights_only:
        state = {"model": _global_names(get_model_state_dict(model)), "step": step}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
        state = {
            "model": _global_names(model_sd),
            "optim": _global_names(optim_sd),
            "scheduler": scheduler.state_dict(),
            "data": data_state,
            "rng": _rng_state(),
            "step": step,
        }
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, model, optimizer, scheduler, data_state: dict) -> tuple[int, dict]:
    """Restore everything in place; returns (step, data_state). DCP fills the keys it is given, so
    `data_state` is the loader's current state, used as the template."""
    live_model, live_optim = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": _global_names(live_model), "optim": _global_names(live_optim), "scheduler": scheduler.state_dict(), "data": data_state,
             "rng": _rng_state(), "step": 0}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=Path(path))
    set_state_dict(model, optimizer, model_state_dict=_local_names(state["model"], live_model),
                   optim_state_dict=_local_names(state["optim"], live_optim), options=OPTIONS)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["step"]), state["data"]


def load_model_weights(path, model) -> None:
    """Load only the model weights of a checkpoint (for export, evaluation and `checkpoint.init_from`)."""
    live = get_model_state_dict(model)
    state = {"model": _global_names(live)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=Path(path))
    set_model_state_dict(model, _local_names(state["model"], live))
