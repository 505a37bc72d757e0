"""adapters.torchtitan.throughput --dry-run: TorchTitan's config and meta-device model for both benchmark shapes,
with PithTrain's parameter counts. TorchTitan is only installed for the GPU benchmark, so CI skips this file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan is not installed (the GPU throughput benchmark brings it)")

REPO = Path(__file__).resolve().parents[1]
# PithTrain's own models on the meta device (framework/configs/small-*.toml), counted at this adapter's writing.
PARAMS = {"qwen3": 3_114_814_464, "deepseek": 2_254_983_168}


@pytest.mark.parametrize("shape", sorted(PARAMS))
def test_dry_run_matches_pithtrain(shape, tmp_path):
    out = tmp_path / "dry.json"
    # A subprocess: TorchTitan's init_logger replaces the root logger's handlers.
    proc = subprocess.run([sys.executable, "-m", "adapters.torchtitan.throughput", "--shape", shape, "--dry-run",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["params_torchtitan"] == PARAMS[shape]
    assert res["params_match"] in (True, None), res  # None: PithTrain did not import (a checkout mid-edit)
    args = res["model_args"]
    assert args["max_seq_len"] == 4096 and args["attn_type"] == "sdpa" and args["moe_args"]["top_k"] in (6, 8)
    assert "--debug.moe_force_load_balance" in res["torchtitan_args"]  # routing defaults to balanced
    if shape == "deepseek" and res["params_pithtrain"] is not None:  # YaRN frequencies and softmax scale match
        assert res["rope_max_abs_diff"] < 1e-6
        scale = res["softmax_scale"]
        assert scale["torchtitan"] == pytest.approx(scale["pithtrain"], rel=1e-9)
