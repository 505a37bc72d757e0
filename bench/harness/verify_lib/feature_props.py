"""Verifier of a PithTrain feature task with its own property script: property tests, a short training run,
unchanged-when-off. The harness copies this file beside every task's hidden tests (bench/harness/verifier.py).

    python feature_props.py <workspace> <pristine framework root> <work dir> <reward.json> <props.py> <steps> \
        -- <--set overrides that turn the feature on>

1. props.py pristine, beside 2.: the unmodified framework's weights, inputs and logits (a failure here is ours:
   exit 1).
2. A <steps>-step CPU training run of the pristine tiny DeepSeek-V2 config with the overrides, through the
   agent's `python -m pithtrain.train`.
3. props.py agent: the task's property tests, the disabled model against the pristine logits, and the run
   (finite, decreasing logged loss; its checkpoint recomputed on held-out data).
Reward 1 only when everything passes; sub-scores say what did.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def start(args: list, path: Path, work: Path, name: str) -> subprocess.Popen:
    """Python with `path` first on PYTHONPATH, output to work/<name>.log. One thread each: the shapes are tiny,
    and OpenMP threads on a busy 2-core machine lose several times their work in spin-waits."""
    env = {**os.environ, "PYTHONPATH": str(path), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    with open(work / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


def finish(proc: subprocess.Popen, work: Path, name: str, timeout: float) -> tuple[int | str, str]:
    """-> (exit status or "timeout", the output's tail); the whole output is echoed to the verifier log."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    text = (work / f"{name}.log").read_text(errors="replace")
    print(f"---- {name} (exit {code})\n{text[-4000:]}")
    return code, text.strip()[-600:]


def main() -> int:
    ws, base, work, out, props_py = (Path(a) for a in sys.argv[1:6])
    steps, sep, feature_args = sys.argv[6], sys.argv[7:8], sys.argv[8:]
    if sep != ["--"] or not feature_args:
        sys.exit("usage: feature_props.py WS BASE WORK REWARD PROPS STEPS -- --set KEY=VALUE ...")
    run_args = [*feature_args, "--set", f"train.steps={steps}", "--set", "train.seq_len=64",
                "--set", "train.micro_batch_size=4", "--set", "train.log_every=5", "--set", "train.eval_batches=1",
                "--set", "train.device=cpu", "--set", "checkpoint.every=0"]  # fmt: skip
    pristine, run, result = work / "pristine.pt", work / "run", work / "props.json"
    cfg = base / "configs" / "tiny-deepseek-v2-lite.toml"
    reference = start([props_py, "pristine", base, pristine], base, work, "pristine")
    training = start(["-m", "pithtrain.train", "--config", cfg, *run_args, "--set", f"train.run_dir={run}"], ws,
                     work, "run")  # fmt: skip
    run_exit, run_tail = finish(training, work, "run", 400)
    code, tail = finish(reference, work, "pristine", 300)
    if code != 0:
        print(f"verifier: the pristine reference failed: {tail}", file=sys.stderr)
        return 1
    sub: dict = {"run_exit": run_exit, **({"run_output": run_tail} if run_exit != 0 else {})}
    code, tail = finish(start([props_py, "agent", ws, pristine, run, steps, result], ws, work, "props"),
                        work, "props", 400)  # fmt: skip
    if code == 3:
        print(f"verifier: the property tests failed on their own: {tail}", file=sys.stderr)
        return 1
    got = json.loads(result.read_text()) if result.is_file() else None
    results = got["results"] if got else {"all": f"the property tests did not finish ({code}): {tail}"}
    sub.update(got["sub"] if got else {})
    failed = {k: v for k, v in results.items() if v}
    props = [k for k in results if k not in ("unchanged_when_disabled", "run")]
    sub["properties_passed"] = sum(not results[k] for k in props)
    sub["properties_total"] = len(props)
    sub["unchanged_when_disabled"] = results.get("unchanged_when_disabled") == ""
    sub["failed"] = failed
    reward = 1.0 if got is not None and not failed else 0.0
    reason = "; ".join(f"{k}: {v}" for k, v in failed.items())[:1000]
    out.write_text(json.dumps({"reward": reward, **sub, "reason": reason}, indent=1) + "\n")
    print(json.dumps({"reward": reward, "reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
