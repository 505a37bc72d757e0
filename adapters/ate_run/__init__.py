"""`ate_run/`: what ATE-Bench adds to a baseline framework's workspace so that it can run the standard run spec.

The registry wheels of TorchTitan and Megatron-Core carry neither launch scripts nor training configs (TorchTitan's
run_train.sh and train_configs/, Megatron-LM's pretrain_gpt.py), and no framework has PithTrain's data. So each
baseline workspace gets an `ate_run/` folder: the framework's thin launch entry and DeepSeek-V2-Lite-shaped
configs (adapters/<framework>/ate_run/), the data module (data.py here) and the data files, written from
PithTrain's built-in corpus and tokenizer, so every framework trains on the same token ids.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def write_data(out: Path) -> dict:
    """train.bin / val.bin / tokenizer.json / info.json in `out`, from PithTrain's builtin dataset."""
    if str(REPO / "framework") not in sys.path:
        sys.path.append(str(REPO / "framework"))
    from pithtrain.data import ASSETS, TokenShards, builtin_dataset

    shards = TokenShards(builtin_dataset())
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        maps = shards.splits[split][0]
        stream = np.concatenate([np.asarray(m) for m in maps]).astype(np.uint32)
        stream.tofile(out / f"{split}.bin")
        counts[split] = int(len(stream))
    shutil.copy2(ASSETS / "tokenizer.json", out / "tokenizer.json")
    meta = {"vocab_size": shards.vocab_size, "eos_id": shards.eos_id, "tokens": counts,
            "source": "PithTrain's built-in corpus (framework/pithtrain/assets/corpus.txt), tokenized with its "
                      "tokenizer.json; one document per paragraph, each followed by eos; every 20th document in val"}
    (out / "info.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def install(workspace: Path, framework: str) -> Path:
    """Copy the framework's launch entry and configs plus data.py into `workspace`/ate_run and write the data."""
    dst = Path(workspace) / "ate_run"
    shutil.copytree(REPO / "adapters" / framework / "ate_run", dst,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(HERE / "data.py", dst / "data.py")
    write_data(dst / "data")
    return dst
