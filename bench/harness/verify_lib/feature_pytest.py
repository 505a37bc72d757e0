"""Verifier of a feature task: the hidden property tests and (on PithTrain) the pristine framework's own tests,
run on the agent's workspace. Each task's tests/test.sh is this script:

    python feature_pytest.py <workspace> <task tests folder> <out folder> [--pristine <test file>]

The harness copies this file (and dump.py, which the e2e tests run, and feature_probe.py, which the probes import)
beside every task's hidden tests.

A workspace without a change against its first git commit scores 0 without running anything. Otherwise a scratch
folder beside <out folder> holds the pristine framework ($ATE_BASELINE, else `git archive` of that commit) and
PITHTRAIN_CACHE (the builtin data tokenized afresh, not from a cache the agent could touch). --pristine: first
`python <test file> pristine <scratch>/pristine.pt` with the pristine framework on PYTHONPATH (the feature-off
outputs the tests compare with, path in $ATE_PRISTINE); its failure is the verifier's ("verifier: ...", exit 1).
Then up to three pytest runs, each a child process with the workspace first on the path:
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
import tempfile
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


def git(ws: Path, *args: str) -> list[str]:
    """A git command on the workspace, whoever owns it (run with GIT_ENV: no git configuration of the machine)."""
    return ["git", "-c", "safe.directory=*", "-C", str(ws), *args]


GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def prepare(ws: Path, here: Path, out: Path, pristine: str | None) -> tuple[Path, Path] | None:
    """(pristine framework, scratch folder); None when the workspace is unchanged (reward.json written)."""
    run = lambda *a: subprocess.run(git(ws, *a), env=GIT_ENV, capture_output=True, text=True)  # noqa: E731
    roots = run("rev-list", "--max-parents=0", "HEAD")
    root = roots.stdout.split()[-1] if roots.returncode == 0 and roots.stdout.split() else ""
    if root and run("diff", "--quiet", root, "--", ".").returncode == 0 \
            and not run("ls-files", "--others", "--exclude-standard").stdout.strip():  # fmt: skip
        reason = "the workspace is unchanged: no diff against the baseline commit"
        (out / "reward.json").write_text(json.dumps({"reward": 0.0, "reason": reason}) + "\n")
        return None
    work = Path(tempfile.mkdtemp(prefix="work.", dir=out.parent))
    base = Path(os.environ.get("ATE_BASELINE") or work / "baseline")
    if not os.environ.get("ATE_BASELINE"):
        base.mkdir()
        if not root:
            sys.exit(f"verifier: the workspace has no first git commit: {roots.stderr.strip()}")
        archive = subprocess.Popen(git(ws, "archive", root), env=GIT_ENV, stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(base)], stdin=archive.stdout)
        archive.stdout.close()
        if archive.wait() or tar.returncode:
            sys.exit(f"verifier: no pristine framework from the workspace's first commit {root!r}")
    os.environ["PITHTRAIN_CACHE"] = str(work / "cache")
    fw = os.environ.setdefault("ATE_FRAMEWORK_BASE", "pithtrain")
    if fw not in ("pithtrain", "torchtitan", "megatron"):
        print(f"{os.environ.get('ATE_TASK', 'feature task')}: no verifier for framework {fw}", file=sys.stderr)
        sys.exit(2)
    if pristine:  # the pristine framework's feature-off outputs, which the tests compare with
        os.environ["ATE_PRISTINE"] = str(work / "pristine.pt")
        env = {**os.environ, "PYTHONPATH": str(base), "OMP_NUM_THREADS": "1"}
        with open(work / "pristine.log", "w") as log:
            cmd = [os.environ.get("PYTHON") or "python3", str(here / pristine), "pristine", str(work / "pristine.pt")]
            if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                tail = "\n".join((work / "pristine.log").read_text().splitlines()[-20:])
                sys.exit(f"verifier: the pristine reference failed:\n{tail}")
    return base, work


def main() -> int:
    ws, here, out = (Path(a).resolve() for a in sys.argv[1:4])
    pristine = sys.argv[5] if sys.argv[4:5] == ["--pristine"] else None
    prepared = prepare(ws, here, out, pristine)
    if prepared is None:
        return 0
    base, work = prepared
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
    (out / "reward.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_failed")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
