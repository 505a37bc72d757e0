"""TorchTitan adapter: the agent's workspace, and (throughput.py) TorchTitan's own Trainer on PithTrain's shapes.

Workspace: TorchTitan 0.2.2 as a user's checkout lays it out (`torchtitan/` at the root, README.md, LICENSE),
from the pinned PyPI wheel (offline: `.whl/` or the wheel cache, see adapters/workspace.py), or from a checkout
of github.com/pytorch/torchtitan at tag v0.2.2 named by $ATE_TORCHTITAN_SRC; one baseline commit.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.workspace import baseline_commit, package_workspace, plain_python_env  # noqa: F401  (adapter API)

python_env = plain_python_env

NAME = "torchtitan"
REQUIREMENT = "torchtitan==0.2.2"


def version() -> dict:
    src = os.environ.get("ATE_TORCHTITAN_SRC")
    return {"framework": NAME, "version": REQUIREMENT.partition("==")[2],
            "source": f"checkout {src}" if src else f"wheel {REQUIREMENT}"}


def build(framework: str, dst: Path) -> Path:
    """The workspace (`framework` is this adapter's NAME: adapters.get only dispatches that)."""
    return package_workspace(dst, REQUIREMENT, "torchtitan", "TorchTitan", "ATE_TORCHTITAN_SRC", NAME)[0]

