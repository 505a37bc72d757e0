"""task.toml's per-framework GPU requirement (framework_gpus) and the instruction a framework gets
(instruction.<framework>.md, instruction.gpu.md, instruction.md), as bench.run and the trial runner use them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.harness.core import HarnessError, discover_tasks, load_task


def task_folder(tmp_path, toml: str, gpu_text: str | None = None):
    (tmp_path / "tests").mkdir()
    (tmp_path / "instruction.md").write_text("Run {framework} on CPU in {workspace}.\n")
    if gpu_text:
        (tmp_path / "instruction.gpu.md").write_text(gpu_text)
    (tmp_path / "task.toml").write_text(toml)
    return tmp_path


def test_framework_gpus_need_a_gpu_only_on_those_frameworks(tmp_path):
    task = load_task(task_folder(tmp_path, 'id = "t"\ncategory = "operate"\nframeworks = ["pithtrain", "torchtitan"]\n'
                                           'framework_gpus = {torchtitan = 1}\ngpus_optional = 1\n',
                                 "Run {framework} on the GPU in {workspace}.\n"))
    assert task.gpus_needed("pithtrain") == 0 and task.gpus_needed("pithtrain-noskills") == 0
    assert task.gpus_needed("torchtitan") == 1
    assert task.gpus_for(0, "pithtrain") == 0 and task.gpus_for(2, "pithtrain") == 1  # optional: one if there
    assert task.gpus_for(2, "torchtitan") == 1
    assert task.instruction("pithtrain", "/ws") == "Run pithtrain on CPU in /ws.\n"
    assert task.instruction("torchtitan", "/ws") == "Run torchtitan on the GPU in /ws.\n"


def test_a_framework_s_own_instruction_comes_first(tmp_path):
    task = load_task(task_folder(tmp_path, 'id = "t"\ncategory = "feature"\nframeworks = ["pithtrain", "megatron"]\n'
                                           'framework_gpus = {megatron = 1}\n', "Run {framework} on the GPU.\n"))
    (tmp_path / "instruction.megatron.md").write_text("Set moe_router_gating in {workspace}.\n")
    assert task.instruction("megatron", "/ws") == "Set moe_router_gating in /ws.\n"
    assert task.instruction("pithtrain-noskills", "/ws") == "Run pithtrain-noskills on CPU in /ws.\n"
    assert task.base("pithtrain-noskills") == "pithtrain" and task.base("megatron") == "megatron"


@pytest.mark.parametrize("value", ['{megatron = 1}', '{torchtitan = -1}', '{torchtitan = "one"}', '1'])
def test_bad_framework_gpus_are_refused_naming_the_key(tmp_path, value):
    folder = task_folder(tmp_path, f'id = "t"\ncategory = "operate"\nframeworks = ["torchtitan"]\n'
                                   f'framework_gpus = {value}\n')
    with pytest.raises(HarnessError, match="framework_gpus"):
        load_task(folder)


def test_operate_tasks_on_the_baselines_need_a_gpu_and_are_skipped_without():
    for name in ("getting-started", "collect-routing-trace", "report-heavy-kernels", "train-and-evaluate"):
        (task,) = discover_tasks([name])
        assert {"torchtitan", "megatron"} <= set(task.frameworks)
        assert task.gpus_needed("torchtitan") == task.gpus_needed("megatron") == 1 and not task.gpus_needed("pithtrain")
    r = subprocess.run([sys.executable, "-m", "bench.run", "--agent", "oracle", "--framework", "megatron", "--tasks",
                        "operate", "--sandbox", "local", "--gpus", "none"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "skip operate/getting-started: needs 1 GPU(s) on megatron, 0 available" in r.stdout + r.stderr
    assert "error: no task to run" in r.stdout + r.stderr
