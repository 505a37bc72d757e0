"""The Q&A keys reject plausible but wrong answers (no sandbox: answers are scored with the qa_keys API against
a PithTrain workspace), and the grader's forbidden claims work as documented. Oracle/null runs of every task
and the check that every key still resolves against today's framework are in test_tasks_oracle.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters import pithtrain
from bench.harness import qa_keys
from bench.harness.core import discover_tasks

BY_NAME = {t.name: t for t in discover_tasks(["qa"])}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return pithtrain.build_workspace(tmp_path_factory.mktemp("ws") / "workspace")


def key(task: str) -> Path:
    return BY_NAME[f"qa/{task}"].tests_dir / "keys" / "pithtrain.toml"


def oracle(task: str, workspace: Path) -> str:
    return qa_keys.render_answer((BY_NAME[f"qa/{task}"].solution_dir("pithtrain") / "answer.md").read_text(), workspace)


def cite(workspace: Path, file: str, symbol: str) -> str:
    return qa_keys.cite(workspace, file, symbol)


# ------------------------------------------------------------------------------------------ forbidden claims


def test_forbidden_claims(tmp_path):
    (tmp_path / "m.py").write_text("def build_mesh():\n    return ('dp', 'ep')\n")
    k = tmp_path / "k.toml"
    k.write_text('[[anchors]]\nid = "mesh"\nfile = "m.py"\nsymbol = "build_mesh"\n\n'
                 '[[facts]]\nid = "dims"\nany = ["dp, ep"]\n\n'
                 "[[forbidden]]\nid = \"ring\"\nany = ['ring attention']\nunless = ['\\bno\\b', \"n't\"]\n")
    ok = "The mesh is (dp, ep) at m.py:2. There is no ring attention"
    assert qa_keys.score(ok, k, tmp_path)["reward"] == 1
    assert qa_keys.score("The mesh is (dp, ep) (m.py:1-2); it doesn't use ring attention.", k, tmp_path)["reward"] == 1
    r = qa_keys.score(ok + ".\nThe mesh is (dp, ep); ring attention runs over m.py:2.", k, tmp_path)
    assert r["reward"] == 0 and r["forbidden_claims"] == ["ring"] and r["facts"] == r["anchors"] == 1
    assert r["forbidden_sentences"] == ["ring attention runs over m.py:2."]  # the clause after `;` stands alone
    # a break needs white space after it ("m.py" ends no sentence); a wrapped line stays in its sentence,
    # a list item or a blank line starts a new one
    assert qa_keys.sentence_at("No x. See m.py for ring attention", 18, 32) == " See m.py for ring attention"
    assert qa_keys.score("The mesh is (dp, ep) at m.py:2 and doesn't\nuse ring attention", k, tmp_path)["reward"] == 1
    for sep in ("\n\n", "\n- ", "\n2. "):
        r = qa_keys.score(f"The mesh is (dp, ep) at m.py:2; no tensor parallelism{sep}ring attention over ep", k, tmp_path)
        assert r["forbidden_claims"] == ["ring"], sep
    k.write_text(k.read_text().replace("unless = ['\\bno\\b', \"n't\"]\n", ""))  # unless is optional
    assert qa_keys.score(ok, k, tmp_path)["forbidden_claims"] == ["ring"]


def test_key_errors_for_forbidden_and_duplicate_ids(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    pass\n")
    k = tmp_path / "k.toml"
    head = '[[anchors]]\nid = "a"\nfile = "m.py"\nsymbol = "f"\n\n'
    k.write_text(head + '[[forbidden]]\nid = "x"\nany = ["("]\n')
    assert "forbidden x: bad regex" in qa_keys.check_key_resolves(k, tmp_path)[0]
    k.write_text(head + '[[forbidden]]\nid = "x"\nunless = ["no"]\n')
    assert "forbidden x: needs `any`" in qa_keys.check_key_resolves(k, tmp_path)[0]
    k.write_text(head + '[[facts]]\nid = "a"\nany = ["f"]\n')
    assert "ids must be unique" in qa_keys.check_key_resolves(k, tmp_path)[0]


# ------------------------------------------------------------------------------------------ Q9: context parallel


def test_context_parallel_claims_fail(workspace):
    k = key("context-parallel")
    mesh = cite(workspace, "pithtrain/parallel/mesh.py", r"Parallel.__init__:init_device_mesh\(")
    config = cite(workspace, "pithtrain/config.py", "ParallelConfig")
    attn = cite(workspace, "pithtrain/models/qwen3_moe.py", "Attention.forward:scaled_dot_product_attention")
    good = (f"PithTrain does not implement context parallelism: ParallelConfig has no cp key ({config}) and the mesh "
            f"is (pp, dp_replicate, efsdp, ep) ({mesh}); attention sees the full sequence ({attn}).")
    assert qa_keys.score(good, k, workspace)["reward"] == 1
    assert qa_keys.score(oracle("context-parallel", workspace), k, workspace)["reward"] == 1
    wrong = [  # right files and lines, invented implementation
        f"Context parallelism is implemented in the device mesh ({mesh}): the mesh (pp, dp_replicate, efsdp, ep) "
        f"reuses the ep dimension as the cp group, the config sets its degree ({config}), and attention ({attn}) "
        "uses ring attention to pass K/V blocks between ranks.",
        f"The sequence is split across ranks along the ep mesh dimension ({mesh}, {config}); each rank attends over "
        f"seq_len / cp tokens at {attn}. Mesh: (pp, dp_replicate, efsdp, ep).",
        # hedged: says it is absent, then describes an implementation anyway
        good + " Sequence parallelism is supported through Ulysses all-to-all over the ep group.",
    ]
    for answer in wrong:
        r = qa_keys.score(answer, k, workspace)
        assert r["reward"] == 0 and r["forbidden_claims"] == ["claims_context_parallel"], (answer, r)
    r = qa_keys.score("PithTrain has no context parallelism.", k, workspace)  # no evidence
    assert r["reward"] == 0 and set(r["missed_anchors"]) == {"parallel_config", "device_mesh"}
    assert r["missing_facts"] == ["mesh_dims_named"]


# ------------------------------------------------------------------------------------------ Q11: grad-norm clipping


def test_grad_norm_wrong_answers_fail(workspace):
    k = key("grad-norm-clipping")
    good = oracle("grad-norm-clipping", workspace)
    assert qa_keys.score(good, k, workspace)["reward"] == 1
    norm = cite(workspace, "pithtrain/parallel/mesh.py", "Parallel.grad_norm")
    step = cite(workspace, "pithtrain/train.py", "optimizer_step")
    # The usual recipe, cited at the right places: not what PithTrain does.
    torch_way = (f"The norm is computed in Parallel.grad_norm ({norm}) by calling torch.nn.utils.clip_grad_norm_ on the "
                 f"local shards (to_local), summing squares in float32 and all-reducing them over all ranks; "
                 f"optimizer_step ({step}) then passes grad_scale to the fused AdamW.")
    r = qa_keys.score(torch_way, k, workspace)
    assert r["reward"] == 0 and r["forbidden_claims"] == ["claims_clip_grad_norm_"]
    assert set(r["missing_facts"]) == {"float64", "divided_by_dp_replicate"} and r["anchors"] == 1
    # Replicas double counted: no dp_replicate division.
    no_division = good.replace("so the sum is divided by dp_replicate", "so the sum is multiplied by dp_replicate")
    assert no_division != good
    r = qa_keys.score(no_division, k, workspace)
    assert r["reward"] == 0 and r["missing_facts"] == ["divided_by_dp_replicate"]
    # fp32 accumulation instead of float64.
    fp32 = good.replace("float64", "float32")
    r = qa_keys.score(fp32, k, workspace)
    assert r["reward"] == 0 and r["missing_facts"] == ["float64"]
    # Clipping placed in the wrong function: the clip anchors are missed.
    elsewhere = good.replace(step, norm)
    for c in (cite(workspace, "pithtrain/train.py", r"optimizer_step:factor\s="),
              cite(workspace, "pithtrain/train.py", r"optimizer_step:grad_scale\s="),
              cite(workspace, "pithtrain/train.py", "optimizer_step:_foreach_mul_")):
        elsewhere = elsewhere.replace(c, norm)
    r = qa_keys.score(elsewhere, k, workspace)
    assert r["reward"] == 0 and set(r["missed_anchors"]) == {"clip_factor", "clip_applied"}
