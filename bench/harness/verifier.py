"""Run a task's hidden verifier after the agent stopped, and read the reward it wrote.

Layout inside the sandbox, under `sandbox.harness_dir` (outside the workspace, written only by the
harness; copied in only now, so the agent never saw it):

    <harness_dir>/verifier/
        tests/       the task's tests/ folder, plus qa_keys.py (Q&A test.sh files run `$TESTS/qa_keys.py`)
                     and verify_lib/*.py (feature verifiers several tasks share)
        answer.md    the agent's final message: the answer channel of Q&A tasks
        baseline/    the workspace as the agent got it (adapter + task setup files), for verifiers that
                     must run framework code the agent could not have edited
        out/         where test.sh writes reward.json

Entry point: `bash tests/test.sh <workspace> <tests_dir> <out_dir>`, run with as_agent=False under the
task's verifier timeout, with env ATE_TASK, ATE_FRAMEWORK (as given, e.g. pithtrain-noskills),
ATE_FRAMEWORK_BASE (the name the task's keys/ and solution/ use), ATE_ANSWER, ATE_BASELINE and the
adapter's python_env. test.sh exits 0 after writing `out/reward.json` = {"reward": 0..1, ...named
sub-scores}; anything else (no file, bad JSON, reward outside [0, 1], non-zero exit, timeout) scores 0
with error "verifier_error: ...".
"""

from __future__ import annotations

import atexit
import json
import math
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness.core import Sandbox, Task

QA_KEYS = Path(__file__).with_name("qa_keys.py")
VERIFY_LIB = Path(__file__).with_name("verify_lib")  # verifier scripts several tasks share
_baselines: dict[str, Path] = {}


def harness_dir(sandbox: Sandbox) -> str:
    """The sandbox's harness folder; backends without one get a fresh root-made folder under /tmp."""
    d = getattr(sandbox, "harness_dir", None)
    if not d:
        r = sandbox.exec("d=$(mktemp -d /tmp/ate-harness.XXXXXX) && chmod 755 \"$d\" && echo \"$d\"", timeout=30,
                         as_agent=False)
        if r.exit_code != 0:
            raise RuntimeError(f"cannot make a harness folder in the sandbox: {r.output.strip()[-300:]}")
        d = r.output.strip().splitlines()[-1]
        sandbox.harness_dir = d  # reuse it for the rest of the trial
    return d


def baseline_workspace(task: Task, framework: str) -> Path | None:
    """A host copy of the workspace the agent started from (built once per framework and task setup)."""
    import adapters

    try:
        adapter = adapters.get(framework)
    except ValueError:
        return None
    setup = task.setup_dir(framework) or task.setup_dir(task.base(framework))
    key = f"{framework}:{setup}"
    if key not in _baselines:
        root = Path(tempfile.mkdtemp(prefix="ate-baseline-"))
        atexit.register(shutil.rmtree, root, True)
        ws = adapter.build(framework, root / "baseline")
        if setup is not None:
            shutil.copytree(setup, ws, dirs_exist_ok=True)
        _baselines[key] = ws
    return _baselines[key]


def _fail(why: str, t0: float, sub: dict | None = None) -> tuple[float, dict, str, float]:
    return 0.0, sub or {}, f"verifier_error: {why}", time.time() - t0


def run_verifier(task: Task, framework: str, sandbox: Sandbox, final_message: str, timeout_s: float,
                 log_dir: Path | None = None) -> tuple[float, dict, str, float]:
    """-> (reward, sub-scores, error, seconds). Call only after the agent stopped."""
    t0 = time.time()
    try:
        vdir = f"{harness_dir(sandbox)}/verifier"
        q = shlex.quote
        with tempfile.TemporaryDirectory(prefix="ate-verifier-") as tmp:
            stage = Path(tmp) / "verifier"
            shutil.copytree(task.tests_dir, stage / "tests")
            shutil.copy2(QA_KEYS, stage / "tests" / "qa_keys.py")
            for f in VERIFY_LIB.glob("*.py"):
                shutil.copy2(f, stage / "tests" / f.name)
            (stage / "answer.md").write_text(final_message or "")
            (stage / "out").mkdir()
            sandbox.exec(f"rm -rf {q(vdir)}", timeout=60, as_agent=False)
            sandbox.copy_in(stage, vdir)
        env = {"ATE_TASK": task.name, "ATE_FRAMEWORK": framework, "ATE_FRAMEWORK_BASE": task.base(framework),
               "ATE_ANSWER": f"{vdir}/answer.md", "PYTHONDONTWRITEBYTECODE": "1"}
        baseline = baseline_workspace(task, framework)
        if baseline is not None:
            sandbox.copy_in(baseline, f"{vdir}/baseline")
            env["ATE_BASELINE"] = f"{vdir}/baseline"
            import adapters

            env = {**adapters.get(framework).python_env(sandbox.workspace, cache_dir=f"{vdir}/cache"), **env}
        tests, out = f"{vdir}/tests", f"{vdir}/out"
        cmd = f"bash {q(tests)}/test.sh {q(sandbox.workspace)} {q(tests)} {q(out)}"
        r = sandbox.exec(cmd, timeout=timeout_s, env=env, workdir=vdir, as_agent=False)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "verifier.log").write_text(f"$ {cmd}\n{r.output}\n[exit {r.exit_code}, {r.duration_s:.1f} s]\n")
        tail = r.output.strip()[-400:]
        if r.timed_out:
            return _fail(f"test.sh timed out after {timeout_s:.0f} s: {tail}", t0)
        if r.exit_code != 0:
            return _fail(f"test.sh exited {r.exit_code}: {tail}", t0)
        got = sandbox.exec(f"cat {q(out)}/reward.json", timeout=30, as_agent=False)
        if got.exit_code != 0:
            return _fail(f"test.sh wrote no reward.json: {tail}", t0)
        try:
            data = json.loads(got.output)
        except json.JSONDecodeError as e:
            return _fail(f"reward.json is not JSON ({e})", t0)
        reward = data.pop("reward", None) if isinstance(data, dict) else None
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward) \
                or not 0.0 <= reward <= 1.0:
            return _fail(f"reward.json needs a number reward in [0, 1], got {reward!r}", t0,
                         data if isinstance(data, dict) else None)
        return float(reward), data, "", time.time() - t0
    except Exception as e:  # a broken sandbox or task folder: never let it pass as a reward
        return _fail(f"{type(e).__name__}: {e}", t0)
