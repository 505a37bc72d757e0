"""Oracle of operate/train-and-evaluate on TorchTitan.

1. 30 steps of the deepseek_v2_lite spec (tiny flavor on CPU, small on a GPU) through ate_run/run_train.sh, with
   TorchTitan's checkpointer saving step 30 model-only in float32 and in the Hugging Face layout
   (checkpoint.last_save_in_hf: the spec's DeepSeekV3StateDictAdapter writes the safetensors).
2. Those safetensors, the config.json TorchTitan does not write (DeepSeek-V2's, from the flavor's model args) and
   the tokenizer go to export/hf.
3. transformers' perplexity of the export on windows 0..15 of 128 (+1) tokens of the val split.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ate_run import data
from ate_run.deepseek_v2_lite import FLAVORS
from transformers import AutoModelForCausalLM

RUN, EXPORT, REPORT = Path("runs/train-eval"), Path("export/hf"), Path("results/eval.json")
STEPS, WINDOWS, LENGTH = 30, 16, 128


def hf_config(a) -> dict:
    """DeepSeek-V2's config.json for TorchTitan's model args. TorchTitan applies YaRN only beyond original_seq_len
    (the flavors set it to seq_len - 1 to turn it on) and scales the softmax by mscale^2 as DeepSeek-V2 does with
    mscale_all_dim = mscale; its dense layers come first."""
    m = a.moe_args
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": a.vocab_size,
        "hidden_size": a.dim, "intermediate_size": a.inter_dim, "moe_intermediate_size": a.moe_inter_dim,
        "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads,
        "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "first_k_dense_replace": a.n_dense_layers,
        "moe_layer_freq": 1, "n_routed_experts": m.num_experts, "n_shared_experts": m.num_shared_experts,
        "num_experts_per_tok": m.top_k, "scoring_func": m.score_func, "norm_topk_prob": m.route_norm,
        "routed_scaling_factor": m.route_scale, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "rope_scaling": {"type": "yarn", "factor": a.rope_factor, "original_max_position_embeddings": a.original_seq_len,
                         "beta_fast": a.beta_fast, "beta_slow": a.beta_slow, "mscale": a.mscale,
                         "mscale_all_dim": a.mscale},
        "max_position_embeddings": a.max_seq_len, "tie_word_embeddings": False, "torch_dtype": "float32",
    }


gpu = torch.cuda.is_available()
flavor = "small" if gpu else "tiny"
env = {**os.environ, "CONFIG_FILE": f"ate_run/{flavor}.toml"}
train = ["ate_run/run_train.sh", "--training.steps", str(STEPS), "--job.dump_folder", str(RUN), "--checkpoint.enable",
         "--checkpoint.interval", str(STEPS), "--checkpoint.last_save_model_only", "--checkpoint.export_dtype",
         "float32", "--checkpoint.last_save_in_hf"]
if subprocess.run(train, env=env).returncode != 0:
    sys.exit("training failed")

saved = RUN / "checkpoint" / f"step-{STEPS}"
shutil.rmtree(EXPORT, ignore_errors=True)
EXPORT.mkdir(parents=True)
for f in saved.glob("*.safetensors*"):
    os.link(f, EXPORT / f.name)  # the same bytes: a hard link, not a second copy of a multi-GB file
(EXPORT / "config.json").write_text(json.dumps(hf_config(FLAVORS[flavor]), indent=1) + "\n")
shutil.copy("ate_run/data/tokenizer.json", EXPORT / "tokenizer.json")

device = "cuda" if gpu else "cpu"
model = AutoModelForCausalLM.from_pretrained(EXPORT, dtype=torch.float32).to(device).eval()
x, y = data.samples(range(WINDOWS), LENGTH, "val")
with torch.no_grad():
    nll = sum(F.cross_entropy(model(input_ids=xi[None].to(device)).logits[0].float(), yi.to(device),
                              reduction="sum").item() for xi, yi in zip(x, y))
REPORT.parent.mkdir(parents=True, exist_ok=True)
REPORT.write_text(json.dumps({"perplexity": math.exp(nll / y.numel()), "num_tokens": y.numel(),
                              "export_dir": str(EXPORT)}) + "\n")
print(REPORT.read_text(), end="")
