"""The feature tasks on TorchTitan and Megatron-Core, on CPU: each oracle (solution/<framework>/) scores 1 through
the hidden verifier (the task's shared property tests through tests/<framework>/probe.py, then a short training run
and the feature-off comparison with the pristine framework), and a change without the feature scores 0 in the
property tests. Skipped where a framework is not installed. On the GPU the same oracles and verifiers run through
bench.run.
"""

from __future__ import annotations

import pytest
from baseline_tasks import FRAMEWORKS, solve, verify, workspace

from bench.harness.core import discover_tasks

# Per task, a file the feature would change: the change without the feature edits it, so that the verifier runs its
# tests rather than stopping at "no diff".
NO_FEATURE = {
    "dynmoe": {"torchtitan": "torchtitan/models/moe/moe.py", "megatron": "megatron/core/transformer/moe/router.py"},
    "moba-attention": {"torchtitan": "torchtitan/models/deepseek_v3/model/model.py",
                       "megatron": "megatron/core/transformer/dot_product_attention.py"},
    "differential-attention": {"torchtitan": "torchtitan/models/deepseek_v3/model/model.py",
                               "megatron": "megatron/core/transformer/multi_latent_attention.py"},
    "moe-plus-plus": {"torchtitan": "torchtitan/models/moe/moe.py", "megatron": "megatron/core/transformer/moe/moe_layer.py"},
}  # fmt: skip
TRIALS = [pytest.param(task.id, fw.values[0], marks=fw.marks, id=f"{task.id}-{fw.values[0]}")
          for task in discover_tasks(["feature"]) for fw in FRAMEWORKS if fw.values[0] in task.frameworks]  # fmt: skip


def test_every_feature_task_on_a_baseline_is_tested():
    assert {(t.values[0], t.values[1]) for t in TRIALS} == {(t, fw) for t, by in NO_FEATURE.items() for fw in by}


@pytest.mark.parametrize("task,fw", TRIALS)
def test_oracle_scores_1(task, fw, tmp_path_factory, tmp_path):
    ws = workspace(fw, tmp_path_factory, tmp_path / "workspace")
    solve(f"feature/{task}", fw, ws, tmp_path)
    result = verify(f"feature/{task}", fw, ws, tmp_path)
    assert result["reward"] == 1.0, result
    assert result["props_passed"] == result["props_total"] > 0 and result["e2e_passed"] == result["e2e_total"] > 0


@pytest.mark.parametrize("task,fw", TRIALS)
def test_a_change_without_the_feature_scores_0(task, fw, tmp_path_factory, tmp_path):
    ws = workspace(fw, tmp_path_factory, tmp_path / "workspace")
    with open(ws / NO_FEATURE[task][fw], "a") as f:
        f.write(f"\n# {task}: not done\n")
    result = verify(f"feature/{task}", fw, ws, tmp_path)
    assert result["reward"] == 0.0, result
    assert result["props_passed"] < result["props_total"] and "props:" in result["reason"], result
