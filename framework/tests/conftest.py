import os
import subprocess
import sys
from pathlib import Path

import pytest

FRAMEWORK = Path(__file__).resolve().parents[1]
CONFIGS = FRAMEWORK / "configs"


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """One builtin-dataset cache per test worker, away from the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("pithtrain-cache")
    os.environ["PITHTRAIN_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=FRAMEWORK.parent
    )
