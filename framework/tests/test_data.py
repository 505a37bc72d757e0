import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from pithtrain import data
from pithtrain.data import ASSETS, EOS, DataLoader, TokenShards, builtin_dataset, eval_batches, main

DOCS = ["Hello world.\nA second line of the first document.", "Ünïcode ✓ and emoji 🚀 in doc two",
        "  third doc\twith   odd spacing", "x"]


def write_docs(path, docs, key="text"):
    if path.suffix == ".txt":
        path.write_text("\n\n\n".join(docs) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({key: docs, "id": list(range(len(docs)))}), path)
    return path


def decode_split(ds, split):
    tok = Tokenizer.from_file(str(ds.path / "tokenizer.json"))
    return tok.decode(np.concatenate(ds.splits[split][0]).tolist(), skip_special_tokens=False)


def synthetic(tmp_path, sizes=(1000, 37, 630)):
    """Dataset whose token stream is 0, 1, 2, ... (split over shards), so a window identifies its sample."""
    stream, shards, off = np.arange(sum(sizes), dtype=np.uint32), [], 0
    for i, n in enumerate(sizes):
        stream[off:off + n].tofile(tmp_path / f"train_{i:05d}.bin")
        shards.append({"file": f"train_{i:05d}.bin", "tokens": n})
        off += n
    index = {"format": data.FORMAT, "dtype": "uint32", "vocab_size": 1 << 20, "eos_id": 0,
             "splits": {"train": {"documents": 1, "tokens": off, "shards": shards}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    return TokenShards(tmp_path)


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".parquet"])
def test_tokenize_roundtrip(tmp_path, ext):
    src = write_docs(tmp_path / f"in{ext}", DOCS, key="body")
    out = tmp_path / "ds"
    assert main(["tokenize", "--tokenizer", str(ASSETS), "--input", str(src), "--out", str(out),
                 "--text-key", "body", "--shard-tokens", "7"]) == 0
    ds = TokenShards(out)
    assert decode_split(ds, "train") == "".join(d + EOS for d in DOCS)
    index = json.loads((out / "index.json").read_text())
    assert index["eos_id"] == ds.eos_id == 0 and index["vocab_size"] == 4096
    assert index["splits"]["train"]["documents"] == len(DOCS) and len(index["splits"]["train"]["shards"]) > 1
    assert index["sources"] == [str(src.resolve())] and len(index["tokenizer_sha256"]) == 64
    # windows read across shard boundaries match the flat stream; labels are inputs shifted by one
    flat = np.concatenate(ds.splits["train"][0]).astype(np.int64)
    for i in range(ds.num_samples(5)):
        x, y = ds.sample(i, 5)
        assert x.tolist() == flat[5 * i:5 * i + 5].tolist() and y.tolist() == flat[5 * i + 1:5 * i + 6].tolist()


def test_val_split_by_documents(tmp_path):
    docs = [f"Document number {i} says hello." for i in range(40)]
    index = data.tokenize_files(ASSETS, [write_docs(tmp_path / "a.txt", docs)], tmp_path / "ds", val_fraction=0.1,
                                progress=False)
    ds = TokenShards(tmp_path / "ds")
    assert decode_split(ds, "val") == "".join(docs[i] + EOS for i in (9, 19, 29, 39))
    assert decode_split(ds, "train") == "".join(d + EOS for i, d in enumerate(docs) if i % 10 != 9)
    assert index["splits"]["val"]["documents"] == 4


def test_bad_input_cli(tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "pithtrain.data", "tokenize", "--tokenizer", str(ASSETS),
                        "--input", str(tmp_path / "missing.txt"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.txt" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,content,needle", [
    ("a.csv", "text\nhello\n", "a.csv"),
    ("b.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "b.jsonl:2"),
    ("c.parquet", None, "'text'"),
    ("d.txt", "\n\n   \n", "d.txt"),
    ("e.jsonl", '{"text": "ok"}\nnot json\n', "e.jsonl"),
])
def test_bad_input(tmp_path, capsys, name, content, needle):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    if content is None:
        write_docs(src, ["some text"], key="body")
    else:
        src.write_text(content)
    out = tmp_path / "ds"
    assert main(["tokenize", "--tokenizer", str(ASSETS), "--input", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temp dir left behind


def test_corrupt_dataset(tmp_path):
    ds = synthetic(tmp_path)
    with open(ds.path / "train_00001.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(data.DataError, match="train_00001.bin"):
        TokenShards(tmp_path)
    (tmp_path / "train_00001.bin").unlink()
    with pytest.raises(data.DataError, match="train_00001.bin: missing"):
        TokenShards(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(data.DataError, match="index.json"):
        TokenShards(tmp_path)
    with pytest.raises(data.DataError, match="index.json: not found"):
        TokenShards(tmp_path / "nope")


def test_train_tokenizer(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text((ASSETS / "corpus.txt").read_text()[:20000])
    assert main(["train-tokenizer", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    tok = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    assert tok.get_vocab_size() == 300 and tok.token_to_id(EOS) == 0 and tok.token_to_id("<|pad|>") == 1
    s = "Any bytes round-trip: ünï 🚀\n\ttab"
    assert tok.decode(tok.encode(s).ids) == s
    assert json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())["eos_token"] == EOS


def test_assets_tokenizer_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(ASSETS))
    assert len(tok) == 4096 and tok.eos_token_id == 0 and tok.pad_token_id == 1
    s = "The assert statement is a convenient way to insert debugging assertions."
    assert tok.decode(tok(s)["input_ids"]) == s


def test_builtin_dataset(tmp_path, monkeypatch):
    path = builtin_dataset(tmp_path)
    assert path.parent == tmp_path and path.name.startswith("builtin-")
    ds = TokenShards(path)
    assert ds.has_split("train") and ds.has_split("val")
    train, val = ds.num_tokens("train"), ds.num_tokens("val")
    assert train > 200_000 and 0.03 < val / (train + val) < 0.07
    mtime = (path / "index.json").stat().st_mtime_ns
    monkeypatch.setenv("PITHTRAIN_CACHE", str(tmp_path))
    assert builtin_dataset() == path and (path / "index.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def ids(batch, seq_len):
    """Sample indices of a synthetic batch (first input token // seq_len), checking labels = inputs shifted."""
    x, y = batch
    assert x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))
    return (x[:, 0] // seq_len).tolist()


def test_loader_determinism_and_epochs(tmp_path):
    ds, S = synthetic(tmp_path), 16
    take = lambda loader, n: [ids(loader.next_batch(), S) for _ in range(n)]
    a, b, c = (DataLoader(ds, S, 4, 2, seed=s) for s in (0, 0, 1))
    assert a.steps_per_epoch == ds.num_samples(S) // 8 == 13
    ea, eb, ec = take(a, 26), take(b, 26), take(c, 26)
    assert ea == eb and ea != ec
    first = sum(ea[:26], [])  # one epoch = 13 steps x 2 micro-batches: distinct samples
    assert len(set(first)) == 104 and max(first) < ds.num_samples(S)
    second = sum(take(a, 26), [])
    assert sorted(second) == sorted(first) and second != first  # a new permutation each epoch
    assert a.epoch == 1


def test_loader_dp_sharding(tmp_path):
    ds, S = synthetic(tmp_path), 16
    r0, r1 = (DataLoader(ds, S, 2, 1, dp_rank=r, dp_size=2, seed=3) for r in (0, 1))
    acc = DataLoader(ds, S, 2, 2, seed=3)
    big = DataLoader(ds, S, 4, 1, seed=3)
    for _ in range(30):  # crosses epoch boundaries
        dp = ids(r0.next_batch(), S) + ids(r1.next_batch(), S)
        assert dp == ids(acc.next_batch(), S) + ids(acc.next_batch(), S) == ids(big.next_batch(), S)


@pytest.mark.parametrize("k", [0, 1, 5, 25, 26, 27, 40])
def test_loader_resume(tmp_path, k):
    ds, S = synthetic(tmp_path), 16
    ref = DataLoader(ds, S, 4, 2, seed=7)
    for _ in range(k):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))
    new = DataLoader(ds, S, 4, 2, seed=7)
    new.load_state_dict(state)
    for _ in range(30):
        assert ids(new.next_batch(), S) == ids(ref.next_batch(), S)


def test_loader_resume_other_layout(tmp_path):
    ds, S = synthetic(tmp_path), 16
    ref = DataLoader(ds, S, 2, 2, seed=1)
    for _ in range(10):
        ref.next_batch()
    ranks = [DataLoader(ds, S, 2, 1, dp_rank=r, dp_size=2, seed=1) for r in (0, 1)]
    for r in ranks:
        r.load_state_dict(ref.state_dict())
    for _ in range(20):
        assert ids(ranks[0].next_batch(), S) + ids(ranks[1].next_batch(), S) == ids(ref.next_batch(), S) + ids(
            ref.next_batch(), S)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(ds, S, 2, 2, seed=2).load_state_dict(ref.state_dict())


def test_loader_too_small(tmp_path):
    ds = synthetic(tmp_path)
    with pytest.raises(ValueError, match="seq_len 512.*grad_accum 2 x dp_size 1 x micro_batch_size 2"):
        DataLoader(ds, 512, 2, 2)


def test_eval_batches(tmp_path):
    ds, S = synthetic(tmp_path), 100
    got = [ids(b, S) for b in eval_batches(ds, S, 4, max_batches=None, split="train")]
    assert sum(got, []) == list(range(ds.num_samples(S))) and [len(g) for g in got] == [4, 4, 4, 4]
    assert [ids(b, S) for b in eval_batches(ds, S, 3, max_batches=2, split="train")] == [[0, 1, 2], [3, 4, 5]]
    assert not ds.has_split("val")
    with pytest.raises(data.DataError, match="no 'val' split"):
        list(eval_batches(ds, S, 4))
