"""The standard run spec's data and metrics, shared by the TorchTitan and Megatron-Core runners.

Data (`--data builtin`): PithTrain's builtin corpus tokenized with its tokenizer (`pithtrain.data.builtin_dataset`),
batched by `pithtrain.data.DataLoader` with the run's seed, so every framework trains on the same micro-batches in
the same order as `python -m pithtrain.train` on that config (one rank; grad_accum micro-batches per step).
Metrics: one JSON line per optimizer step in PithTrain's `metrics.jsonl` fields (step, loss, grad_norm,
tokens_per_s, peak_mem_gib, step_time_s), so the runs compare column for column.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRIC_FIELDS = ("step", "loss", "grad_norm", "tokens_per_s", "peak_mem_gib", "step_time_s")


def builtin_batches(seq_len: int, micro_batch: int, grad_accum: int, seed: int) -> Iterator[tuple]:
    """(input_ids [B, S], labels [B, S]) int64 CPU tensors, forever, as PithTrain's trainer draws them."""
    if str(REPO / "framework") not in sys.path:
        sys.path.append(str(REPO / "framework"))
    from pithtrain.data import DataLoader, TokenShards, builtin_dataset

    loader = DataLoader(TokenShards(builtin_dataset()), seq_len, micro_batch, grad_accum, seed=seed)
    while True:
        yield loader.next_batch()


def write_metrics(path: str | Path, rows: list[dict]) -> None:
    """`rows` (dicts holding at least step and loss) as metrics.jsonl in PithTrain's fields, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in METRIC_FIELDS if r.get(k) is not None}) + "\n")
    os.replace(tmp, path)
