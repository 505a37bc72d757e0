"""Data pipeline: train a tokenizer, tokenize text into packed token shards, and load them deterministically.

    python -m pithtrain.data train-tokenizer --input corpus.txt --vocab-size 4096 --out tok/
    python -m pithtrain.data tokenize --tokenizer tok/ --input a.jsonl b.parquet --out data/ --val-fraction 0.01

A dataset folder holds index.json plus raw little-endian uint32 shards (train_00000.bin, val_00000.bin, ...):
every document's tokens followed by EOS, concatenated, so each split reads as one contiguous token stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

ASSETS = Path(__file__).parent / "assets"
EOS, PAD = "<|endoftext|>", "<|pad|>"
FORMAT = "pithtrain-tokens-v1"
DTYPE = np.dtype("<u4")
EXTS = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad input or a corrupt dataset. The message is one line and names the offending file."""


# ---------------------------------------------------------------------------------------------- reading text
def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Stream documents: .txt = blocks separated by blank lines; .jsonl / .parquet = field/column text_key."""
    if path.suffix == ".txt":
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in chain(f, [""]):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                        raise DataError(f"{path}:{n}: no string field {text_key!r}")
                    yield row[text_key]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        pf = pq.ParquetFile(path)
        if text_key not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _documents(path: Path, text_key: str) -> Iterator[str]:
    """read_documents with every read/parse failure turned into a one-line DataError naming the file."""
    try:
        yield from (d for d in read_documents(path, text_key) if d)
    except DataError:
        raise
    except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError, ArrowInvalid, ...
        raise DataError(f"{path}: {type(e).__name__}: {e}") from None


def _check_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        if p.suffix not in EXTS:
            raise DataError(f"{p}: unknown extension {p.suffix!r} (expected one of {', '.join(EXTS)})")
    return paths


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(inputs: Iterable[str | Path], vocab_size: int, out: str | Path, text_key: str = "text"):
    """Byte-level BPE (GPT-2 style: any byte string round-trips) with EOS and PAD special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    paths = _check_inputs(inputs)
    if vocab_size < 258:
        raise DataError(f"--vocab-size {vocab_size}: must be >= 258 (256 bytes + 2 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(chain.from_iterable(_documents(p, text_key) for p in paths), trainer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
              "pad_token": PAD, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 20}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    return path


# ---------------------------------------------------------------------------------------------- tokenizing
class _ShardWriter:
    """Appends tokens to {split}_00000.bin, {split}_00001.bin, ... of at most cap tokens each."""

    def __init__(self, folder: Path, split: str, cap: int):
        self.folder, self.split, self.cap, self.shards, self.docs, self.f = folder, split, cap, [], 0, None

    def write(self, arr: np.ndarray):
        while len(arr):
            if self.f is None or self.shards[-1]["tokens"] == self.cap:
                self.close()
                self.shards.append({"file": f"{self.split}_{len(self.shards):05d}.bin", "tokens": 0})
                self.f = open(self.folder / self.shards[-1]["file"], "wb")
            n = min(len(arr), self.cap - self.shards[-1]["tokens"])
            arr[:n].tofile(self.f)
            self.shards[-1]["tokens"] += n
            arr = arr[n:]

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None

    def info(self) -> dict:
        return {"documents": self.docs, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def tokenize_files(tokenizer: str | Path, inputs: Iterable[str | Path], out: str | Path, text_key: str = "text",
                   val_fraction: float = 0.0, shard_tokens: int = 1 << 27, progress: bool = True) -> dict:
    """Tokenize documents into a new dataset folder `out`; returns its index.

    Built in a temp dir beside `out` and renamed at the end, so a failed or interrupted run leaves nothing.
    Document i (counted over all inputs, in order) goes to val when floor((i+1)*f) > floor(i*f): an evenly
    spread, deterministic fraction f of the documents.
    """
    from tokenizers import Tokenizer

    paths, tok_path, out = _check_inputs(inputs), tokenizer_file(tokenizer), Path(out)
    if not 0.0 <= val_fraction < 1.0 or shard_tokens < 1:
        raise DataError(f"{out}: need 0 <= val_fraction < 1 and shard_tokens >= 1")
    if out.exists():
        raise DataError(f"{out}: already exists")
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise DataError(f"{tok_path}: cannot load tokenizer ({' '.join(str(e).split())})") from None
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise DataError(f"{tok_path}: tokenizer has no {EOS} token")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writers = {s: _ShardWriter(tmp, s, shard_tokens) for s in ("train", "val")}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.20) skips offsets
    try:
        ndocs, ntok, last = 0, 0, time.monotonic()
        for path in paths:
            docs = _documents(path, text_key)
            while batch := list(islice(docs, 1024)):
                ids = {"train": [], "val": []}
                for enc in encode(batch, add_special_tokens=False):
                    split = "val" if int((ndocs + 1) * val_fraction) > int(ndocs * val_fraction) else "train"
                    ids[split].append(enc.ids + [eos])
                    writers[split].docs += 1
                    ndocs, ntok = ndocs + 1, ntok + len(enc.ids) + 1
                for split, lists in ids.items():
                    writers[split].write(np.fromiter(chain.from_iterable(lists), dtype=DTYPE))
                if progress and time.monotonic() - last > 2:
                    print(f"tokenize: {path.name}: {ndocs:,} documents, {ntok:,} tokens", file=sys.stderr)
                    last = time.monotonic()
        for w in writers.values():
            w.close()
        splits = {"train": writers["train"].info()} | ({"val": writers["val"].info()} if val_fraction else {})
        if not ndocs or "val" in splits and not splits["val"]["tokens"]:
            names = ", ".join(map(str, paths))
            raise DataError(f"{names}: {ndocs} documents, too few for val fraction {val_fraction}" if ndocs
                            else f"{names}: no documents (text key {text_key!r})")
        shutil.copy(tok_path, tmp / "tokenizer.json")
        index = {"format": FORMAT, "dtype": "uint32", "vocab_size": tok.get_vocab_size(), "eos_id": eos,
                 "tokenizer": "tokenizer.json", "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
                 "sources": [str(p.resolve()) for p in paths], "text_key": text_key, "val_fraction": val_fraction,
                 "splits": splits}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        try:
            os.rename(tmp, out)
        except OSError as e:  # e.g. another process created `out` meanwhile
            raise DataError(f"{out}: {e.strerror}") from None
        return index
    finally:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_dataset(cache_dir: str | Path | None = None) -> Path:
    """Tokenize the embedded corpus with the embedded tokenizer once (5% val) and return the cached folder.

    The folder name hashes corpus + tokenizer + format, so changed assets never reuse a stale cache; concurrent
    callers (e.g. several ranks) may all build, and the first rename wins.
    """
    corpus, tok = ASSETS / "corpus.txt", ASSETS / "tokenizer.json"
    h = hashlib.sha256(FORMAT.encode())
    for f in (corpus, tok):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    root = Path(cache_dir or os.environ.get("PITHTRAIN_CACHE") or Path.home() / ".cache" / "pithtrain")
    out = root / f"builtin-{h.hexdigest()[:16]}"
    if not (out / "index.json").is_file():
        if out.exists() and not (out / "index.json").is_file():
            shutil.rmtree(out)  # incomplete, so not made by an (atomic) build: rebuild
        try:
            tokenize_files(tok, [corpus], out, val_fraction=0.05, progress=False)
        except DataError:
            if not (out / "index.json").is_file():
                raise
    return out


# ---------------------------------------------------------------------------------------------- loading
class TokenShards:
    """A dataset folder, memory-mapped; each split is one contiguous token stream across its shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / "index.json"
        try:
            self.index = index = json.loads(index_path.read_text())
            if index["format"] != FORMAT or index["dtype"] != "uint32":
                raise DataError(f"{index_path}: unsupported format {index['format']!r} / dtype {index['dtype']!r}")
            self.vocab_size, self.eos_id = int(index["vocab_size"]), int(index["eos_id"])
            self.splits: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
            for split, info in index["splits"].items():
                maps = []
                for shard in info["shards"]:
                    f, n = self.path / shard["file"], int(shard["tokens"])
                    size = f.stat().st_size if f.is_file() else None
                    if size != n * DTYPE.itemsize:
                        raise DataError(f"{f}: {'missing' if size is None else f'{size} bytes'}, index.json "
                                        f"says {n} uint32 tokens ({n * DTYPE.itemsize} bytes)")
                    maps += [np.memmap(f, dtype=DTYPE, mode="r")] if n else []
                if sum(map(len, maps)) != int(info["tokens"]):
                    raise DataError(f"{index_path}: {split} shard token counts do not sum to {info['tokens']}")
                self.splits[split] = (maps, np.cumsum([0] + [len(m) for m in maps]))
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{index_path}: not found (make one with `python -m pithtrain.data tokenize`)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index_path}: malformed ({type(e).__name__}: {e})") from None

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def _stream(self, split: str):
        if split not in self.splits:
            raise DataError(f"{self.path / 'index.json'}: no {split!r} split (has {', '.join(self.splits)})")
        return self.splits[split]

    def num_tokens(self, split: str = "train") -> int:
        return int(self._stream(split)[1][-1])

    def num_samples(self, seq_len: int, split: str = "train") -> int:
        """Non-overlapping windows of seq_len + 1 tokens at stride seq_len (neighbours share one token)."""
        return max(0, (self.num_tokens(split) - 1) // seq_len)

    def sample(self, i: int, seq_len: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Window i as (input_ids, labels), int64, labels = input_ids shifted left by one."""
        if not 0 <= i < self.num_samples(seq_len, split):
            raise IndexError(f"sample {i} out of range for {split} with seq_len {seq_len}")
        maps, offs = self._stream(split)
        start, n, parts = i * seq_len, seq_len + 1, []
        k = int(np.searchsorted(offs, start, side="right")) - 1
        while n:
            a = start - int(offs[k])
            parts.append(maps[k][a:a + n])
            start, n, k = start + len(parts[-1]), n - len(parts[-1]), k + 1
        w = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        if int(w.max()) >= self.vocab_size:
            raise DataError(f"{self.path / 'index.json'}: token id {int(w.max())} >= vocab_size {self.vocab_size}")
        return w[:-1], w[1:]

    def batch(self, indices: Iterable[int], seq_len: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.sample(int(i), seq_len, split) for i in indices))
        return torch.stack(xs), torch.stack(ys)


class DataLoader:
    """Deterministic, resumable micro-batches for one data-parallel rank.

    Each epoch visits a permutation of all samples drawn from (seed, epoch); the tail that does not fill a global
    batch is skipped. A step's global batch of G = grad_accum * dp_size * micro_batch_size samples is laid out
    [accum][dp][micro_batch], so micro-step m of rank r reads [m*dp*B + r*B, m*dp*B + (r+1)*B): any dp x accum
    split of the same G sees the same samples per optimizer step. `position` counts samples of the epoch's
    permutation consumed by all ranks together, so a checkpoint taken at a step boundary also resumes under a
    different dp_size / grad_accum with the same G.
    """

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, grad_accum: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, split: str = "train"):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        self.shards, self.seq_len, self.B, self.accum = shards, seq_len, micro_batch_size, grad_accum
        self.rank, self.dp, self.seed, self.split = dp_rank, dp_size, seed, split
        self.global_batch = grad_accum * dp_size * micro_batch_size
        self.num_samples = shards.num_samples(seq_len, split)
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"{shards.path} ({split}) has {self.num_samples} samples of seq_len {seq_len} (+1), fewer than one "
                f"global batch of {self.global_batch} = grad_accum {grad_accum} x dp_size {dp_size} x "
                f"micro_batch_size {micro_batch_size}; lower seq_len or the batch sizes")
        self.epoch, self.position, self._perm = 0, 0, (-1, None)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _order(self) -> np.ndarray:
        if self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples))
        return self._perm[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: (input_ids [B, S], labels [B, S]), int64."""
        if self.position >= self.steps_per_epoch * self.global_batch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.B
        self.position += self.dp * self.B
        return self.shards.batch(self._order()[start:start + self.B], self.seq_len, self.split)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "num_samples": self.num_samples, "split": self.split}

    def load_state_dict(self, state: dict):
        for key in ("seed", "seq_len", "num_samples", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        if state["position"] % (self.dp * self.B):
            raise ValueError(f"data loader position {state['position']} is not on a dp_size x micro_batch_size "
                             f"({self.dp} x {self.B}) boundary")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None,
                 split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows 0, 1, 2, ... in order (last batch may be short): the same held-out tokens every evaluation."""
    n = shards.num_samples(seq_len, split)
    n = n if max_batches is None else min(n, max_batches * batch_size)
    for s in range(0, n, batch_size):
        yield shards.batch(range(s, min(s + batch_size, n)), seq_len, split)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pithtrain.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files: .txt .jsonl .parquet")
    common.add_argument("--text-key", default="text", help="field/column with the text in .jsonl/.parquet (text)")
    t = sub.add_parser("train-tokenizer", parents=[common], help="train a byte-level BPE tokenizer")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. 2 special tokens (4096)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder for tokenizer.json + tokenizer_config.json")
    k = sub.add_parser("tokenize", parents=[common], help="tokenize text into a dataset folder of uint32 shards",
                       description=".txt: documents are separated by blank lines. .jsonl / .parquet: one document "
                       "per row, in --text-key. EOS is appended to every document.")
    k.add_argument("--tokenizer", required=True, metavar="DIR_OR_FILE", help="folder with tokenizer.json, or the file")
    k.add_argument("--out", required=True, metavar="DIR", help="dataset folder to create (must not exist)")
    k.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents held out as val (0)")
    k.add_argument("--shard-tokens", type=int, default=1 << 27, help="max tokens per shard file (2**27)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "train-tokenizer":
            tok = train_tokenizer(args.input, args.vocab_size, args.out, args.text_key)
            print(f"wrote {args.out}/tokenizer.json: vocab size {tok.get_vocab_size()}")
        else:
            index = tokenize_files(args.tokenizer, args.input, args.out, args.text_key, args.val_fraction,
                                   args.shard_tokens)
            for split, info in index["splits"].items():
                print(f"{args.out}: {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
                      f"{len(info['shards'])} shard(s)")
    except DataError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
