"""Oracle of operate/train-and-evaluate on PithTrain, in one process (each Python start imports torch, which
takes tens of seconds in some sandboxes): 30 steps of the DeepSeek-V2-Lite config (tiny on CPU, small on a
GPU), the framework's own HF export of step 30, and transformers' perplexity of the export on windows
0..15 of 128 (+1) tokens of the builtin data's val split (exactly PithTrain's TokenShards.sample)."""

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pithtrain import convert, train
from pithtrain.data import TokenShards, builtin_dataset

RUN, EXPORT, REPORT = "runs/train-eval", "export/hf", Path("results/eval.json")
WINDOWS, LENGTH = 16, 128

gpu = torch.cuda.is_available()
if not gpu:
    torch.set_num_threads(1)  # the tiny model gains nothing from more threads; a shared CPU thrashes
# The small config saves no checkpoint by default; weights only: export reads nothing else.
config, extra = ("small", ["checkpoint.enabled=true", "checkpoint.weights_only=true"]) if gpu else ("tiny", [])
sets = [a for s in ["train.steps=30", f"train.run_dir={RUN}", *extra] for a in ("--set", s)]
if train.main(["--config", f"configs/{config}-deepseek-v2-lite.toml", *sets]) != 0:
    sys.exit("training failed")
if convert.main(["export", "--run-dir", RUN, "--step", "30", "--out", EXPORT]) != 0:
    sys.exit("export failed")

device = "cuda" if gpu else "cpu"
model = AutoModelForCausalLM.from_pretrained(EXPORT, dtype=torch.float32).to(device).eval()
shards = TokenShards(builtin_dataset())
nll, count = 0.0, 0
with torch.no_grad():
    for i in range(WINDOWS):
        x, y = (t.to(device) for t in shards.sample(i, LENGTH, "val"))
        nll += F.cross_entropy(model(input_ids=x[None]).logits[0].float(), y, reduction="sum").item()
        count += y.numel()
REPORT.parent.mkdir(parents=True, exist_ok=True)
report = {"perplexity": math.exp(nll / count), "num_tokens": count, "export_dir": EXPORT}
REPORT.write_text(json.dumps(report) + "\n")
print(REPORT.read_text(), end="")
