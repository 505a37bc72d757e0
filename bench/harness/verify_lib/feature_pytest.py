"""Verifier of a feature task: the hidden property tests and (on PithTrain) the pristine framework's own tests,
run on the agent's workspace.

    python feature_pytest.py <workspace> <pristine framework> <reward.json> <scratch folder> <task tests folder>

The harness copies this file (and dump.py, which the e2e tests run) beside every task's hidden tests.

Up to three pytest runs, each a child process with the workspace first on the path:
  props     test_*.py of the task's tests folder, except those marked e2e: the feature's properties on tiny inputs
  baseline  BASELINE_TESTS of the pristine framework's tests/, against the agent's code (PithTrain only: the
            baselines' registry packages ship no tests); at the same time as props
  e2e       the tests marked e2e: a short training run with the feature on; with it off, the tiny models
            against the pristine framework's (parameters, logits, losses, gradients). Only once every property
            test passed: the reward is 0 otherwise, and a training run costs more than all the rest
The framework is $ATE_FRAMEWORK_BASE (default pithtrain); the tests read it to pick their probe.
Reward 1 when every test of every run passed (and each run collected tests); the sub-scores count them and
name the failures. The agent's code breaking or hanging a run is its failure (reward 0); a problem of this
script itself exits non-zero.
"""

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

BASELINE_TESTS = ["tests/test_ops_router.py", "tests/test_deepseek_v2.py::test_parity_with_transformers"]
TIMEOUT_S = 420


def junit(path: Path) -> tuple[int, list[str]]:
    """(tests run, 'name: message' of each failed, errored or skipped test) from a junit XML file."""
    if not path.is_file():
        return 0, []
    cases = ET.parse(path).getroot().iter("testcase")
    total, bad = 0, []
    for case in cases:
        total += 1
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bad.append(f"{case.get('name')} ({tag}): {msg[0][:300] if msg else ''}")
    return total, bad


def main() -> int:
    ws, base, out, work, here = (Path(a).resolve() for a in sys.argv[1:6])
    missing = [m for m in ("torch", "pytest", "transformers") if importlib.util.find_spec(m) is None]
    if missing:  # the verifier's environment, not the agent's work
        sys.exit(f"check.py: {sys.executable} lacks {', '.join(missing)}")
    (work / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    e2e: end-to-end (training run, pristine comparison)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ws), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "ATE_WS": str(ws),
        "ATE_BASE": str(base),
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    tests = sorted(str(p) for p in here.glob("test_*.py"))
    runs = {
        "props": [*tests, "-m", "not e2e", "-c", str(work / "pytest.ini")],
        "e2e": [*tests, "-m", "e2e", "-c", str(work / "pytest.ini")],
    }
    if os.environ.get("ATE_FRAMEWORK_BASE", "pithtrain") == "pithtrain":
        runs["baseline"] = [
            *(str(base / t) for t in BASELINE_TESTS),
            "-c",
            str(base / "pyproject.toml"),
            "--rootdir",
            str(base),
            "-o",
            "addopts=",
        ]

    def start(name: str):
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(work / f"tmp-{name}"),
            "--junitxml",
            str(work / f"{name}.xml"),
            *runs[name],
        ]
        log = open(work / f"{name}.log", "w")
        return subprocess.Popen(cmd, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT), log

    result: dict = {"reward": 0.0}
    reasons = []

    def finish(name: str, proc, log) -> bool:
        """Wait for a run and score it; -> whether every test passed."""
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            reasons.append(f"{name}: timed out after {TIMEOUT_S} s")
        log.close()
        total, bad = junit(work / f"{name}.xml")
        result[f"{name}_passed"], result[f"{name}_total"] = total - len(bad), total
        if bad:
            result[f"{name}_failed"] = bad
            reasons.append(f"{name}: {len(bad)} of {total} tests failed ({bad[0].split(':')[0]}, ...)")
        elif total == 0 or code != 0:
            tail = (work / f"{name}.log").read_text()[-600:]
            reasons.append(f"{name}: pytest exited {code} after {total} tests: {tail}")
        log_tail = (work / f"{name}.log").read_text()[-3000:]
        print(f"== {name}: exit {code}, {total - len(bad)}/{total} passed\n{log_tail}")
        return not bad and total > 0 and code == 0

    procs = {name: start(name) for name in ("props", "baseline") if name in runs}
    if finish("props", *procs.pop("props")):
        procs["e2e"] = start("e2e")
    else:
        result["e2e_passed"] = result["e2e_total"] = 0
        print("== e2e: not run (a property test failed)")
    for name, (proc, log) in procs.items():
        finish(name, proc, log)
    result["reward"] = 0.0 if reasons else 1.0
    result["reason"] = "; ".join(reasons)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_failed")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
