"""The side-by-side throughput runner's plumbing: commands per framework, argument checks, and the table
(ratios at equal tokens per step, MFU from PithTrain's FLOP formula, failures kept as rows)."""

import json
import sys

import pytest

from adapters import throughput


def write(path, **fields):
    path.write_text(json.dumps(fields))


def test_table_ratios_mfu_and_failures(tmp_path):
    common = dict(shape="qwen3", routing="balanced", device="NVIDIA H100 80GB HBM3", torch="2.11.0", seq_len=4096)
    write(tmp_path / "a.json", framework="pithtrain", setting="mb2", micro_batch=2, tokens_per_s=60000.0,
          peak_mem_gib=47.0, **common)
    write(tmp_path / "b.json", framework="pithtrain", setting="mb4", micro_batch=4, tokens_per_s=90000.0,
          peak_mem_gib=52.0, **common)
    write(tmp_path / "c.json", framework="torchtitan", version="0.2.2", setting="mb2", micro_batch=2,
          tokens_per_s=45000.0, peak_mem_gib=49.0, **common)
    write(tmp_path / "d.failed.json", framework="megatron", setting="mb2", error="rc=3", shape="qwen3",
          routing="balanced")
    md = throughput.build_table(tmp_path)
    rows = {(r["framework"], r["setting"]): r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    tt = rows[("torchtitan", "mb2")]
    assert tt["tokens_per_step"] == 8192 and tt["vs_pithtrain_same_batch"] == 0.75 and tt["vs_pithtrain_best"] == 0.5
    fpt = throughput.flops_per_token("qwen3")
    assert tt["mfu"] == round(fpt * 45000 / 989e12, 4) and 3e9 < fpt < 5e9
    assert rows[("pithtrain", "mb4")]["vs_pithtrain_best"] == 1.0
    assert rows[("megatron-core", "mb2")]["error"] == "rc=3" and rows[("megatron-core", "mb2")]["tokens_per_s"] is None
    assert "| qwen3 | balanced | torchtitan | mb2 | 8192 | 45,000 |" in md
    assert (tmp_path / "table.csv").read_text().startswith("shape,routing,framework,setting")


def test_runner_commands_name_each_frameworks_own_entry(tmp_path):
    out = tmp_path / "r.json"
    pt = throughput.runner_command("pithtrain", "deepseek", "balanced", ["--set", "train.micro_batch_size=4"], 6, 4,
                                   out, ["train.compile=layers"])
    assert pt[:3] == [sys.executable, "-m", "pithtrain.benchmark"] and "model.router.force_balanced=true" in pt
    assert pt[pt.index("--config") + 1].endswith("small-deepseek-v2-lite.toml") and "train.compile=layers" in pt
    tt = throughput.runner_command("torchtitan", "qwen3", "natural", ["--micro-batch", "2"], 6, 4, out, [])
    assert tt[2] == "adapters.torchtitan.throughput" and tt[tt.index("--routing") + 1] == "natural"
    mg = throughput.runner_command("megatron", "qwen3", "balanced", [], 6, 4, out, [])
    assert mg[2] == "adapters.megatron.throughput"


@pytest.mark.parametrize("args, message", [
    (["--out", "x", "--only", "pithtrain:mb3"], "--only: unknown setting"),
    (["--out", "x", "--shapes", "llama"], "--shapes: unknown 'llama'"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    assert throughput.main(args) == 2
    assert message in capsys.readouterr().err
