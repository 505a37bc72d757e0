"""The baseline frameworks' workspaces: the pinned package laid out as a checkout, one reproducible commit."""

from __future__ import annotations

import pytest

import adapters
from adapters import workspace


@pytest.mark.parametrize("framework,top,probe", [
    ("torchtitan", "torchtitan", "torchtitan/models/deepseek_v3/model/model.py"),
    ("megatron", "megatron", "megatron/core/transformer/moe/router.py"),
])
def test_workspace_is_the_pinned_package_in_one_reproducible_commit(framework, top, probe, tmp_path):
    adapter = adapters.get(framework)
    a = adapter.build(framework, tmp_path / "a")
    b = adapter.build(framework, tmp_path / "b")
    assert (a / probe).is_file() and (a / "README.md").read_text().strip()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert adapter.baseline_commit(a) == adapter.baseline_commit(b)  # same files, same hash
    assert workspace.git(["status", "--porcelain"], a) == ""
    assert adapter.version()["version"] == adapter.REQUIREMENT.partition("==")[2]
    with pytest.raises(FileExistsError):
        adapter.build(framework, a)


def test_a_checkout_named_by_the_source_variable_replaces_the_wheel(tmp_path, monkeypatch):
    src = tmp_path / "checkout"
    (src / "torchtitan").mkdir(parents=True)
    (src / "torchtitan" / "train.py").write_text("print('from the checkout')\n")
    (src / "README.md").write_text("# torchtitan checkout\n")
    monkeypatch.setenv("ATE_TORCHTITAN_SRC", str(src))
    adapter = adapters.get("torchtitan")
    ws = adapter.build("torchtitan", tmp_path / "ws")
    assert (ws / "torchtitan" / "train.py").read_text() == "print('from the checkout')\n"
    assert adapter.version()["source"] == f"checkout {src}"
    monkeypatch.setenv("ATE_TORCHTITAN_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ATE_TORCHTITAN_SRC"):
        adapter.build("torchtitan", tmp_path / "ws2")
