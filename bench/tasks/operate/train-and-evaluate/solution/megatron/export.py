"""Megatron-Core checkpoint -> Hugging Face DeepSeek-V2 export, and the export's perplexity (oracle of
operate/train-and-evaluate on Megatron-Core).

    python export.py <tiny|small> <cuda|cpu>

Megatron-Core has no exporter, so this is ours, written from the two models' layouts. Per layer:
  input_layernorm, pre_mlp_layernorm      -> input_layernorm, post_attention_layernorm
  self_attention.linear_q_proj            -> self_attn.q_proj          (per head: [nope, rope], as HF)
  self_attention.linear_kv_down_proj      -> self_attn.kv_a_proj_with_mqa  ([kv latent, rope key], as HF)
  self_attention.kv_layernorm             -> self_attn.kv_a_layernorm
  self_attention.linear_kv_up_proj        -> self_attn.kv_b_proj       (per head: [k nope, v], as HF)
  self_attention.linear_proj              -> self_attn.o_proj
  mlp.linear_fc1 = [gate; up], linear_fc2 -> mlp.{gate,up,down}_proj   (dense layers)
  mlp.router                              -> mlp.gate
  mlp.experts.local_experts.E.*           -> mlp.experts.E.{gate,up,down}_proj
  mlp.shared_experts.*                    -> mlp.shared_experts.{gate,up,down}_proj
Megatron's MLA rotates the rope dims as DeepSeek does (pairs (0,1), (2,3), ... after its own reordering, which
leaves q.k unchanged), and its YaRN, mscale and softmax scale follow the config's fields named as in HF.
"""

import json
import math
import sys
from pathlib import Path

import ate_run.pretrain_gpt as pg
import torch
import torch.nn.functional as F
from ate_run import data
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

RUN, EXPORT, REPORT = Path("runs/train-eval"), Path("export/hf"), Path("results/eval.json")
STEPS, WINDOWS, LENGTH = 30, 16, 128


def to_hf(state: dict, num_layers: int) -> dict:
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
          "model.norm.weight": state["decoder.final_layernorm.weight"], "lm_head.weight": state["output_layer.weight"]}
    names = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm",
             "self_attention.linear_q_proj": "self_attn.q_proj",
             "self_attention.linear_kv_down_proj": "self_attn.kv_a_proj_with_mqa",
             "self_attention.kv_layernorm": "self_attn.kv_a_layernorm",
             "self_attention.linear_kv_up_proj": "self_attn.kv_b_proj", "self_attention.linear_proj": "self_attn.o_proj",
             "mlp.router": "mlp.gate"}

    def mlp(src: str, dst: str) -> None:
        hf[f"{dst}.gate_proj.weight"], hf[f"{dst}.up_proj.weight"] = state[f"{src}.linear_fc1.weight"].chunk(2)
        hf[f"{dst}.down_proj.weight"] = state[f"{src}.linear_fc2.weight"]

    for i in range(num_layers):
        src, dst = f"decoder.layers.{i}", f"model.layers.{i}"
        for a, b in names.items():
            if f"{src}.{a}.weight" in state:
                hf[f"{dst}.{b}.weight"] = state[f"{src}.{a}.weight"]
        if f"{src}.mlp.linear_fc1.weight" in state:
            mlp(f"{src}.mlp", f"{dst}.mlp")
        if f"{src}.mlp.shared_experts.linear_fc1.weight" in state:
            mlp(f"{src}.mlp.shared_experts", f"{dst}.mlp.shared_experts")
        e = 0
        while f"{src}.mlp.experts.local_experts.{e}.linear_fc1.weight" in state:
            mlp(f"{src}.mlp.experts.local_experts.{e}", f"{dst}.mlp.experts.{e}")
            e += 1
    return {k: v.float().contiguous() for k, v in hf.items()}


def hf_config(cfg: dict) -> dict:
    m, g = cfg["model"], cfg["gpt"]
    dense = m["moe_layer_freq"].index(1)
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": g["vocab_size"],
        "hidden_size": m["hidden_size"], "intermediate_size": m["ffn_hidden_size"],
        "moe_intermediate_size": m["moe_ffn_hidden_size"], "num_hidden_layers": m["num_layers"],
        "num_attention_heads": m["num_attention_heads"], "num_key_value_heads": m["num_attention_heads"],
        "q_lora_rank": m["q_lora_rank"] or None, "kv_lora_rank": m["kv_lora_rank"],
        "qk_nope_head_dim": m["qk_head_dim"], "qk_rope_head_dim": m["qk_pos_emb_head_dim"],
        "v_head_dim": m["v_head_dim"], "first_k_dense_replace": dense, "moe_layer_freq": 1,
        "n_routed_experts": m["num_moe_experts"],
        "n_shared_experts": m["moe_shared_expert_intermediate_size"] // m["moe_ffn_hidden_size"],
        "num_experts_per_tok": m["moe_router_topk"], "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": m.get("moe_router_topk_scaling_factor") or 1.0, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "hidden_act": "silu", "attention_bias": False,
        "rms_norm_eps": m["layernorm_epsilon"], "rope_theta": m["rotary_base"],
        "rope_scaling": {"type": "yarn", "factor": m["rotary_scaling_factor"],
                         "original_max_position_embeddings": m["original_max_position_embeddings"],
                         "beta_fast": m["beta_fast"], "beta_slow": m["beta_slow"], "mscale": m["mscale"],
                         "mscale_all_dim": m["mscale_all_dim"]},
        "max_position_embeddings": cfg["train"]["seq_length"], "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def main(config: str, device: str) -> None:
    cfg = pg.load_config(Path("ate_run") / f"{config}.toml")
    model = pg.build_model(cfg, device)
    pg.load_checkpoint(model, RUN / "checkpoints" / f"iter_{STEPS:07d}")
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    EXPORT.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(state, cfg["model"]["num_layers"]), str(EXPORT / "model.safetensors"), metadata={"format": "pt"})
    (EXPORT / "config.json").write_text(json.dumps(hf_config(cfg), indent=1) + "\n")
    del model
    pg.teardown_world()

    hf = AutoModelForCausalLM.from_pretrained(EXPORT, dtype=torch.float32).to(device).eval()
    x, y = data.samples(range(WINDOWS), LENGTH, "val")
    with torch.no_grad():
        nll = sum(F.cross_entropy(hf(input_ids=xi[None].to(device)).logits[0].float(), yi.to(device),
                                  reduction="sum").item() for xi, yi in zip(x, y))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"perplexity": math.exp(nll / y.numel()), "num_tokens": y.numel(),
                                  "export_dir": str(EXPORT)}) + "\n")
    print(REPORT.read_text(), end="")


if __name__ == "__main__":
    main(*sys.argv[1:3])
