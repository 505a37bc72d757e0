"""Training data of the ATE-Bench standard run spec: PithTrain's built-in corpus, tokenized with its tokenizer and
shipped as files, batched in the order PithTrain's trainer uses, so every framework trains on the same tokens.

Files in `data/` beside this module:
    train.bin, val.bin   uint32 token ids, one stream per split (95% / 5% of the corpus)
    tokenizer.json       the Hugging Face `tokenizers` file the ids were made with
    info.json            vocab_size, eos_id and the token count of each split

A sample is a window of seq_len + 1 tokens starting at a multiple of seq_len (neighbours share one token): its
first seq_len tokens are the input, its last seq_len the next-token labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).with_name("data")


def info() -> dict:
    return json.loads((DATA / "info.json").read_text())


def tokens(split: str = "train") -> np.ndarray:
    """One split's token stream (memory-mapped)."""
    path = DATA / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such split (have: {sorted(p.stem for p in DATA.glob('*.bin'))})")
    return np.memmap(path, dtype=np.uint32, mode="r")


def num_samples(seq_len: int, split: str = "train") -> int:
    return max(0, (len(tokens(split)) - 1) // seq_len)


def samples(indices, seq_len: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Windows `indices` as (input_ids [B, S], labels [B, S]), int64."""
    stream = tokens(split)
    w = torch.from_numpy(np.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in indices]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def batches(seq_len: int, micro_batch: int, grad_accum: int = 1, seed: int = 0,
            split: str = "train") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches (input_ids, labels) forever, grad_accum of them per optimizer step. Each epoch visits a
    permutation of all samples drawn from (seed, epoch); the tail that does not fill a step's batch is skipped."""
    n, per_step = num_samples(seq_len, split), micro_batch * grad_accum
    if n < per_step:
        raise ValueError(f"{split} has {n} samples of seq_len {seq_len}, fewer than one step's {per_step}")
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n // per_step * per_step, micro_batch):
            yield samples(order[start:start + micro_batch], seq_len, split)
        epoch += 1
