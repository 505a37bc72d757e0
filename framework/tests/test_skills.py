"""The agent skills (skills/*/check.py), run as a user runs them: a subprocess in this folder with
PYTHONPATH=<this folder>, on CPU with the tiny configs. Each skill has a PASS case (last stdout line
`PASS: ...`, exit 0) and a failing one (`FAIL: ...`, exit 1, or for bad input one `error:` line, exit 2)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FRAMEWORK = Path(__file__).resolve().parents[1]
SMALL = ["--set", "train.micro_batch_size=2", "--set", "train.seq_len=32"]
QWEN, DEEPSEEK = "configs/tiny-qwen3-moe.toml", "configs/tiny-deepseek-v2-lite.toml"


def skill(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(FRAMEWORK), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, f"skills/{name}/check.py", *map(str, args)]
    return subprocess.run(cmd, cwd=FRAMEWORK, env=env, capture_output=True, text=True, timeout=timeout)


def verdict(r: subprocess.CompletedProcess) -> str:
    lines = r.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def assert_pass(r):
    assert r.returncode == 0 and verdict(r).startswith("PASS: "), r.stdout[-3000:] + r.stderr[-3000:]


def assert_fail(r, *words: str):
    assert r.returncode == 1 and verdict(r).startswith("FAIL: "), r.stdout[-3000:] + r.stderr[-3000:]
    for w in words:
        assert w in verdict(r), verdict(r)


def assert_bad_args(r, *words: str):
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and err.startswith("error: "), (r.returncode, err[-2000:])
    assert not verdict(r).startswith(("PASS", "FAIL"))
    for w in words:
        assert w in err, err


def test_every_skill_has_a_skill_md_and_a_script():
    names = sorted(p.name for p in (FRAMEWORK / "skills").iterdir() if p.is_dir())
    assert names == ["add-new-model", "estimate-memory", "launch-distributed", "profile-step",
                     "validate-correctness"]
    index = (FRAMEWORK / "skills" / "README.md").read_text()
    for name in names:
        text = (FRAMEWORK / "skills" / name / "SKILL.md").read_text()
        head = text.split("---")[1]
        assert f"name: {name}\n" in head and "description: Use " in head, name
        assert f"({name}/SKILL.md)" in index and (FRAMEWORK / "skills" / name / "check.py").is_file()


# ---- validate-correctness ----


def test_parity_of_both_tiny_configs_passes():
    r = skill("validate-correctness")
    assert_pass(r)
    assert "ok   parity tiny-qwen3-moe" in r.stdout and "ok   parity tiny-deepseek-v2-lite" in r.stdout


def test_parity_fails_for_perturbed_weights():
    r = skill("validate-correctness", "--config", DEEPSEEK, "--perturb", "1e-3")
    assert_fail(r, "tiny-deepseek-v2-lite")


def write_run(folder: Path, losses: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": v, "grad_norm": 1.0} for i, v in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_reference_run_comparison(tmp_path):
    ref = write_run(tmp_path / "ref", [8.31, 8.02, 7.65])
    same = write_run(tmp_path / "same", [8.31, 8.02, 7.65])
    drift = write_run(tmp_path / "drift", [8.31, 8.03, 7.70])
    def compare(candidate, *extra):
        return skill("validate-correctness", "--reference-run", ref, "--candidate-run", candidate, *extra)

    assert_pass(compare(same, "--keys", "loss,grad_norm"))
    assert_fail(compare(drift), "step 2")
    assert_bad_args(compare(tmp_path / "nope"), "metrics.jsonl")


# ---- profile-step ----


def test_profile_step_writes_sorted_csv(tmp_path):
    out = tmp_path / "prof" / "kernels.csv"
    r = skill("profile-step", "--config", DEEPSEEK, *SMALL, "--warmup", "1", "--top", "10", "--out", out,
              "--nsys")
    assert_pass(r)
    assert "nsys:" in r.stdout  # absent here, or skipped without a GPU: said, not fatal
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["kernel_name", "total_time_ms", "instances", "mean_time_ms"]
    assert 3 <= len(rows) <= 10
    totals = [float(row["total_time_ms"]) for row in rows]
    assert totals == sorted(totals, reverse=True) and totals[0] > 0


def test_profile_step_fails_on_diverged_step_and_bad_layout(tmp_path):
    r = skill("profile-step", "--config", QWEN, *SMALL, "--set", "optim.lr=1e30", "--set",
              "optim.warmup_steps=0", "--out", tmp_path / "nan.csv")
    assert_fail(r, "not finite")
    out = tmp_path / "pp" / "kernels.csv"
    r = skill("profile-step", "--config", QWEN, "--set", "parallel.pp=2", "--out", out)
    assert_bad_args(r, "world size")
    assert not out.parent.exists()


# ---- estimate-memory ----


def test_estimate_matches_a_two_rank_expert_parallel_run():
    r = skill("estimate-memory", "--config", QWEN, *SMALL, "--nproc", "2", "--set", "parallel.ep=2",
              "--measure")
    assert_pass(r)
    measured = [line.split() for line in r.stdout.splitlines() if line.split()[1:2] == ["params"]]
    assert [row[0] for row in measured] == ["0", "1"] and all(row[-1] == "0.00%" for row in measured)  # exact


def test_estimate_fails_with_a_wrong_assumption_or_a_tight_budget():
    def estimate(*args):
        return skill("estimate-memory", "--config", QWEN, *args)

    assert_fail(estimate(*SMALL, "--measure", "--optim-states", "1"), "optim")
    assert_fail(estimate("--budget-gib", "0.01"), "needs")
    assert_bad_args(estimate("--nproc", "2", "--set", "parallel.ep=3"), "parallel.ep")


# ---- add-new-model ----


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_existing_families_meet_the_model_contract(family):
    r = skill("add-new-model", "--family", family)
    assert_pass(r)
    assert "ok   registered in config.py" in r.stdout and "ok   parity:" in r.stdout


def test_broken_model_file_fails(tmp_path):
    source = (FRAMEWORK / "pithtrain" / "models" / "qwen3_moe.py").read_text()
    broken = source.replace("    active = hidden * cfg.vocab_size\n", "    active = 0  # lm_head forgotten\n")
    assert broken != source
    (tmp_path / "my_moe.py").write_text(broken)
    r = skill("add-new-model", "--file", tmp_path / "my_moe.py", "--config", QWEN)
    assert_fail(r, "flops_per_token")
    assert "ok   forward/backward" in r.stdout  # the checks before it passed
    assert_bad_args(skill("add-new-model", "--file", tmp_path / "my_moe.py"), "--config")


# ---- launch-distributed ----


def test_launch_two_ranks_matches_one_process(tmp_path):
    r = skill("launch-distributed", "--config", QWEN, *SMALL, "--nproc", "2", "--set", "parallel.ep=2",
              "--run", "--run-dir", tmp_path)
    assert_pass(r)
    assert "torchrun --nproc-per-node 2 -m pithtrain.train --config configs/tiny-qwen3-moe.toml" in r.stdout
    assert "sbatch --nodes=1 --gpus-per-node=2 scripts/slurm.sh" in r.stdout
    rows = (tmp_path / "distributed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2]


def test_launch_impossible_layout_exits_2():
    assert_bad_args(skill("launch-distributed", "--config", QWEN, "--nproc", "3", "--set", "parallel.pp=2"),
                    "world size 3")
