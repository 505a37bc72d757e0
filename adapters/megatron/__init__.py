"""Megatron-LM adapter: the agent's workspace, and (throughput.py) Megatron-Core's GPT model on PithTrain's shapes.

Workspace: Megatron-Core 0.16.1 as laid out in a Megatron-LM checkout (`megatron/core/` at the root, README.md),
from the pinned PyPI wheel `megatron-core` (offline: `.whl/` or the wheel cache, see adapters/workspace.py), or
from a checkout of github.com/NVIDIA/Megatron-LM at tag core_v0.16.1 named by $ATE_MEGATRON_SRC (then
`megatron/` holds megatron/training too); one baseline commit. Transformer Engine is not part of it: it cannot be
built without network and CUDA headers here, so Megatron's local (non-TE) layer specs are what runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.workspace import baseline_commit, package_workspace, plain_python_env  # noqa: F401  (adapter API)

python_env = plain_python_env

NAME = "megatron"
REQUIREMENT = "megatron-core==0.16.1"


def version() -> dict:
    src = os.environ.get("ATE_MEGATRON_SRC")
    return {"framework": NAME, "version": REQUIREMENT.partition("==")[2],
            "source": f"checkout {src}" if src else f"wheel {REQUIREMENT}", "transformer_engine": "not built (offline)"}


def build(framework: str, dst: Path) -> Path:
    """The workspace (`framework` is this adapter's NAME: adapters.get only dispatches that)."""
    return package_workspace(dst, REQUIREMENT, "megatron", "Megatron-Core", "ATE_MEGATRON_SRC", NAME)[0]

