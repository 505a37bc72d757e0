"""TorchTitan train spec `deepseek_v2_lite` for the ATE-Bench standard run spec, loaded by TorchTitan itself through
`[experimental] custom_import = "ate_run.deepseek_v2_lite"` in the configs beside this file.

It is TorchTitan's own DeepSeek-V3 spec (model, parallelize function, MoE load-balancing optimizers, LR schedule,
loss, Hugging Face state-dict adapter) with three changes:
- model flavors `tiny` and `small`: the DeepSeek-V2-Lite shapes of PithTrain's tiny and small configs;
- the data: PithTrain's built-in corpus from `ate_run/data/` (no tokenizer or download needed), in PithTrain's
  order (`ate_run/data.py`), seeded by `debug.seed`;
- metrics: besides TorchTitan's console log, `<job.dump_folder>/metrics.jsonl` gets one JSON line per logged step
  (step, loss, grad_norm, lr, tokens_per_s, step_time_s, peak_mem_gib), and `<job.dump_folder>/config.json` the
  resolved job config.

Routing can be observed with a forward hook on `torchtitan.models.moe.moe.TokenChoiceTopKRouter`, whose forward
returns (top_scores [tokens, top_k], selected_experts_indices [tokens, top_k], num_tokens_per_expert).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torchtitan.components.metrics import build_metrics_processor
from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs, get_train_spec
from torchtitan.models.moe import MoEArgs
from torchtitan.protocols.train_spec import register_train_spec

NAME = "deepseek_v2_lite"

# DeepSeek-V2-Lite layer shapes: softmax top-k routing without renormalisation, 2 shared experts, one dense layer
# first, MLA without q compression, YaRN RoPE. TorchTitan stretches RoPE only when seq_len > original_seq_len, so
# original_seq_len is seq_len - 1 (YaRN on, as in PithTrain); TorchTitan's ramp rounding keeps the same frequencies.
# No load balancing (load_balance_coeff None): TorchTitan has no auxiliary loss, and its expert bias would change
# which experts a token selects, which DeepSeek-V2 does not.
FLAVORS = {
    "tiny": DeepSeekV3ModelArgs(
        vocab_size=4096, dim=64, inter_dim=192, moe_inter_dim=48, n_layers=3, n_dense_layers=1, n_heads=4,
        norm_eps=1e-6, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_seq_len=128, original_seq_len=127, rope_theta=10000.0, rope_factor=4.0, beta_fast=32, beta_slow=1,
        mscale=0.707, attn_type="sdpa", attn_mask_type="causal",
        moe_args=MoEArgs(num_experts=8, num_shared_experts=2, top_k=2, score_func="softmax", route_norm=False,
                         route_scale=1.0, score_before_experts=False, load_balance_coeff=None),
    ),
    "small": DeepSeekV3ModelArgs(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=4, n_dense_layers=1, n_heads=16,
        norm_eps=1e-6, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_seq_len=4096, original_seq_len=4095, rope_theta=10000.0, rope_factor=40.0, beta_fast=32, beta_slow=1,
        mscale=0.707, attn_type="sdpa", attn_mask_type="causal",
        moe_args=MoEArgs(num_experts=64, num_shared_experts=2, top_k=6, score_func="softmax", route_norm=False,
                         route_scale=1.0, score_before_experts=False, load_balance_coeff=None),
    ),
}


class BuiltinData:
    """A stateful iterable of ({"input": ids}, labels) micro-batches, as TorchTitan's Trainer expects; the state
    (micro-batches consumed) goes into TorchTitan's checkpoints, and a resumed run skips that many."""

    def __init__(self, seq_len: int, micro_batch: int, grad_accum: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1):
        self.seq_len, self.micro_batch, self.grad_accum, self.seed = seq_len, micro_batch, grad_accum, seed
        self.dp_rank, self.dp_size, self.consumed = dp_rank, dp_size, 0

    def __iter__(self):
        from ate_run import data

        # One rank: PithTrain's order. Several: rank r takes every dp_size-th micro-batch of that order.
        stream = data.batches(self.seq_len, self.micro_batch, self.grad_accum * self.dp_size, self.seed)
        for i, (x, y) in enumerate(stream):
            if i < self.consumed * self.dp_size or i % self.dp_size != self.dp_rank:
                continue
            self.consumed += 1
            yield {"input": x}, y

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state.get("consumed", 0))


def build_builtin_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, **kwargs) -> BuiltinData:
    t = job_config.training
    grad_accum = max(1, t.global_batch_size // (t.local_batch_size * dp_world_size)) if t.global_batch_size > 0 else 1
    return BuiltinData(t.seq_len, t.local_batch_size, grad_accum, job_config.debug.seed or 0, dp_rank, dp_world_size)


class JsonlLogger:
    """Wraps TorchTitan's metric logger: also appends each logged step to metrics.jsonl (flushed per line)."""

    FIELDS = {"loss": "loss_metrics/global_avg_loss", "grad_norm": "grad_norm", "lr": "lr",
              "tokens_per_s": "throughput(tps)", "step_time_s": "time_metrics/end_to_end(s)",
              "peak_mem_gib": "memory/max_active(GiB)"}

    def __init__(self, inner, path: Path):
        self.inner, self.file = inner, open(path, "a")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: float(metrics[v]) for k, v in self.FIELDS.items() if v in metrics}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.inner.log(metrics, step)

    def close(self) -> None:
        self.file.close()
        self.inner.close()


def build_metrics_with_jsonl(job_config, parallel_dims, model_args=None, tag=None):
    processor = build_metrics_processor(job_config, parallel_dims, model_args, tag)
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(job_config.job.dump_folder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(job_config), indent=1, default=str) + "\n")
        os.replace(tmp, out / "config.json")
        processor.logger = JsonlLogger(processor.logger, out / "metrics.jsonl")
    return processor


register_train_spec(NAME, dataclasses.replace(
    get_train_spec(), model_args=FLAVORS, build_dataloader_fn=build_builtin_dataloader, build_tokenizer_fn=None,
    build_validator_fn=None, build_metrics_processor_fn=build_metrics_with_jsonl,
))
