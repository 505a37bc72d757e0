"""The baseline frameworks' workspaces: the pinned package laid out as a checkout plus the standard run spec's
ate_run/ (launch entry, configs, PithTrain's data as files), one reproducible commit."""

from __future__ import annotations

import importlib.util

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
    assert (a / "ate_run" / "README.md").is_file() and (a / "ate_run" / "data" / "train.bin").stat().st_size > 0
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


def test_ate_run_data_are_pithtrains_batches_in_its_order(tmp_path, monkeypatch):
    """ate_run/data.py over the shipped token files yields what PithTrain's DataLoader yields, epoch wrap included."""
    import itertools
    import sys

    import torch

    from adapters import ate_run

    ate_run.write_data(tmp_path / "data")
    monkeypatch.syspath_prepend(str(ate_run.REPO / "framework"))
    from pithtrain.data import DataLoader, TokenShards, builtin_dataset

    spec = importlib.util.spec_from_file_location("shipped_data", ate_run.HERE / "data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    monkeypatch.setattr(data, "DATA", tmp_path / "data")
    assert data.info()["vocab_size"] == 4096
    for seq, micro, accum, seed in ((128, 8, 1, 0), (512, 4, 2, 3)):
        loader = DataLoader(TokenShards(builtin_dataset()), seq, micro, accum, seed=seed)
        steps = loader.steps_per_epoch * accum + 3  # into the second epoch
        for (x, y), (px, py) in zip(itertools.islice(data.batches(seq, micro, accum, seed), steps),
                                    (loader.next_batch() for _ in range(steps))):
            assert torch.equal(x, px) and torch.equal(y, py)
    with pytest.raises(FileNotFoundError, match="no such split"):
        data.tokens("test")
    assert sys.modules.get("shipped_data") is None
