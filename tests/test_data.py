"""The data pipeline: prepare / shards / metadata, packing invariants, deterministic order, iterator state, process
sharding, synthetic tasks, errors and the prepare CLI."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from v4jax.training import data
from v4jax.training.config import TrainConfig

TEXTS = {
    "a.txt": "def f(x):\n    return x + 1\n",
    "b.txt": "héllo wörld ✓ — unicode\n",
    "c.txt": "",  # empty: skipped
    "d.txt": "x = 1\n" * 7,
    "sub/e.txt": "nested file\n",
}


def _write(root, texts=TEXTS):
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path):
    src = _write(tmp_path / "src")
    meta = data.prepare([src], tmp_path / "tok")
    return tmp_path / "tok", meta


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory):
    """Many short documents, so rows hold several documents each."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    texts = {f"doc{i:03d}.txt": "".join(rng.choice(list("abcdefgh "), rng.integers(1, 30))) for i in range(60)}
    data.prepare([_write(root / "src", texts)], root / "tok", shard_tokens=300)
    return data.TokenDataset(root / "tok", 512)


class FakeTokenizer:
    """A tokenizer with a large vocabulary (uint32 shards) and fixed ids."""

    def __init__(self, vocab_size):
        self.vocab_size, self.eos_id, self.pad_id, self.bos_id = vocab_size, vocab_size - 1, vocab_size - 2, None

    def encode(self, text):
        return np.asarray([self.vocab_size - 3, 5, len(text)], np.int32)

    def decode(self, ids):
        return ""

    def spec(self):
        return {"kind": "fake"}


def test_byte_tokenizer():
    tok = data.ByteTokenizer()
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = tok.encode("aé✓")
    assert ids.dtype == np.int32 and list(ids[:1]) == [97] and len(ids) == 1 + 2 + 3
    assert tok.decode(np.concatenate([[258], ids, [256]])) == "aé✓"
    assert data.load_tokenizer("bytes").spec() == {"kind": "bytes"}


def test_prepare_round_trip_and_metadata(corpus):
    path, meta = corpus
    tok = data.ByteTokenizer()
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "tokens-00000.bin"]  # no .tmp left
    assert json.loads((path / "metadata.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 259 and meta["tokenizer"] == {"kind": "bytes"}
    assert (meta["eos_id"], meta["pad_id"], meta["bos_id"]) == (256, 257, 258)
    kept = ["a.txt", "b.txt", "d.txt", "sub/e.txt"]  # sorted walk, the empty file skipped
    assert [s.rsplit("src/", 1)[1] for s in meta["sources"]] == kept
    assert len(meta["skipped"]) == 1 and meta["skipped"][0].endswith("c.txt")
    lengths = [len(TEXTS[k].encode()) + 2 for k in kept]
    assert meta["num_documents"] == 4 and meta["num_tokens"] == sum(lengths)
    shard = meta["shards"][0]
    assert shard["num_tokens"] == sum(lengths) and shard["num_documents"] == 4
    assert shard["document_ends"] == list(np.cumsum(lengths))
    assert (path / "tokens-00000.bin").stat().st_size == 2 * sum(lengths)

    ds = data.TokenDataset(path, 512)
    for i, name in enumerate(kept):
        doc = ds.document(i)
        assert doc[0] == 258 and doc[-1] == 256
        assert tok.decode(doc) == TEXTS[name]


def test_shards_and_stream(tmp_path):
    src = _write(tmp_path / "src")
    whole = data.prepare([src], tmp_path / "one")
    meta = data.prepare([str(src / "*.txt"), src / "sub"], tmp_path / "many", shard_tokens=20)
    assert len(meta["shards"]) == 4 and [s["num_documents"] for s in meta["shards"]] == [1, 1, 1, 1]
    one, many = data.TokenDataset(tmp_path / "one"), data.TokenDataset(tmp_path / "many")
    assert one.num_tokens == many.num_tokens == whole["num_tokens"]
    stream = one.tokens(0, one.num_tokens)
    np.testing.assert_array_equal(many.tokens(0, many.num_tokens), stream)
    np.testing.assert_array_equal(many.tokens(25, 70), stream[25:70])  # crosses shard boundaries
    with pytest.raises(FileExistsError, match="not empty"):
        data.prepare([src], tmp_path / "many")
    again = data.prepare([src / "a.txt"], tmp_path / "many", overwrite=True)
    assert again["num_documents"] == 1 and sorted(p.name for p in (tmp_path / "many").iterdir()) == [
        "metadata.json", "tokens-00000.bin"]


@pytest.mark.parametrize("vocab,dtype", [(259, "uint16"), (65536, "uint16"), (65537, "uint32"), (100_000, "uint32")])
def test_dtype_choice(tmp_path, vocab, dtype):
    src = _write(tmp_path / "src", {"a.txt": "abc"})
    meta = data.prepare([src], tmp_path / "tok", FakeTokenizer(vocab) if vocab != 259 else "bytes")
    assert meta["dtype"] == dtype
    ds = data.TokenDataset(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokens-00000.bin").stat().st_size == ds.num_tokens * np.dtype(dtype).itemsize
    if vocab != 259:
        np.testing.assert_array_equal(ds.document(0), [vocab - 3, 5, 3, vocab - 1])


def test_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = ["def", "return", "x", "f", "(", ")", ":", "+", "1", "=", "<unk>"]
    tk = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tk.add_special_tokens(["<|endoftext|>", "<pad>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, data.HFTokenizer) and tok.vocab_size == 13
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (11, 12, None)
    src = _write(tmp_path / "src", {"a.txt": "def f ( x ) : return x + 1"})
    meta = data.prepare([src], tmp_path / "tok", tok)
    assert meta["tokenizer"]["kind"] == "hf" and meta["tokenizer"]["sha256"] == tok.sha256
    ds = data.TokenDataset(tmp_path / "tok", 64)
    doc = ds.document(0)
    assert doc[-1] == 11 and tok.decode(doc) == "def f ( x ) : return x + 1"
    # the run's tokenizer must be the one the directory was prepared with
    cfg = TrainConfig(data=str(tmp_path / "tok"), seq_len=4, batch_size=2)
    with pytest.raises(ValueError, match="prepared with tokenizer"):
        data.make_dataset(cfg, 512)
    cfg = TrainConfig(data=str(tmp_path / "tok"), seq_len=4, batch_size=2, tokenizer=str(tmp_path / "tokenizer.json"))
    assert next(data.make_dataset(cfg, 64))["tokens"].max() < 13
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.HFTokenizer(tmp_path / "nope.json")


def test_pack_row():
    eos, pad = 256, 257
    #          doc A ....... | doc B ..... | pad
    row = np.array([1, 2, eos, 3, 4, 5, eos, 6, pad, pad])
    out = data.pack_row(row, eos, num_valid=8)
    np.testing.assert_array_equal(out["tokens"], row[:-1])
    np.testing.assert_array_equal(out["targets"], row[1:])
    np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3, 0])
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0, 0])
    assert all(v.dtype == np.int32 for v in out.values())


def test_packing_invariants(small_docs):
    ds, seq = small_docs, 16
    assert len(ds.metadata["shards"]) > 3  # rows cross shard boundaries
    rows = data.PackedRows(ds, seq)
    assert len(rows) == data.num_rows(ds.num_tokens, seq) == -(-(ds.num_tokens - 1) // seq)
    stream = ds.tokens(0, ds.num_tokens)
    padded = np.concatenate([stream, np.full(len(rows) * seq + 1 - stream.size, ds.pad_id)])
    for i in range(len(rows)):
        r = rows[i]
        np.testing.assert_array_equal(r["tokens"], padded[i * seq:(i + 1) * seq])
        np.testing.assert_array_equal(r["targets"], padded[i * seq + 1:(i + 1) * seq + 1])
        valid = np.arange(i * seq, (i + 1) * seq) < stream.size
        target_valid = np.arange(i * seq + 1, (i + 1) * seq + 1) < stream.size
        eos = (r["tokens"] == ds.eos_id) & valid
        # segment ids: 1 at row start, +1 right after each EOS, 0 on padding
        expected_seg = np.where(valid, 1 + np.concatenate([[0], np.cumsum(eos)[:-1]]), 0)
        np.testing.assert_array_equal(r["segment_ids"], expected_seg)
        # positions restart at each segment start; BOS is at position 0 of every whole document
        starts = np.concatenate([[True], eos[:-1]]) & valid
        assert np.all(r["positions"][starts] == 0)
        assert np.all(np.diff(r["positions"])[~starts[1:] & valid[1:]] == 1)
        assert np.all(r["positions"][(r["tokens"] == ds.bos_id)] == 0)
        # loss mask: zero exactly where the input is EOS (target is the next document) or the target is padding
        np.testing.assert_array_equal(r["loss_mask"], (~eos & target_valid).astype(np.int32))
    assert (rows[len(rows) - 1]["loss_mask"] == 0).any() or stream.size % seq == 1


def _stack(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in data.BATCH_KEYS}


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in data.BATCH_KEYS)


def test_determinism_and_epochs(small_docs):
    make = lambda seed, **kw: data.dataset_iterator(small_docs, seq_len=8, batch_size=4, seed=seed, **kw)
    it = make(0)
    first = [next(it) for _ in range(6)]
    assert all(_equal(first[k], make(0).batch(k)) for k in range(6))
    assert it.state()["step"] == 6
    other = make(1)
    assert not all(_equal(first[k], other.batch(k)) for k in range(6))
    b = first[0]
    assert set(b) == set(data.BATCH_KEYS) and all(v.shape == (4, 8) and v.dtype == np.int32 for v in b.values())
    # every epoch is a permutation of the train rows; epochs differ in order
    rows = data.PackedRows(small_docs, 8, *data.split_rows(data.num_rows(small_docs.num_tokens, 8), "train"))
    n = len(rows)
    assert it.rows_per_epoch == n
    key = lambda tokens: tokens.tobytes()
    all_rows = sorted(key(rows[i]["tokens"]) for i in range(n))
    seen = np.concatenate([it.batch(k)["tokens"] for k in range(-(-2 * n // 4) + 1)])
    assert sorted(key(t) for t in seen[:n]) == all_rows
    assert sorted(key(t) for t in seen[n:2 * n]) == all_rows
    assert [key(t) for t in seen[:n]] != [key(t) for t in seen[n:2 * n]]
    it.step = -(-2 * n // 4)
    assert it.epoch == 2


def test_state_save_restore(small_docs):
    it = data.dataset_iterator(small_docs, seq_len=8, batch_size=4, seed=3, prefetch=2)
    for _ in range(5):
        next(it)
    saved = json.loads(json.dumps(it.state()))
    expected = [next(it) for _ in range(3)]
    resumed = data.dataset_iterator(small_docs, seq_len=8, batch_size=4, seed=3).restore(saved)
    assert resumed.step == 5 and all(_equal(e, next(resumed)) for e in expected)
    it.restore(saved)  # rewinding a prefetching iterator
    assert all(_equal(e, next(it)) for e in expected)
    it.close()
    with pytest.raises(ValueError, match="seed"):
        data.dataset_iterator(small_docs, seq_len=8, batch_size=4, seed=4).restore(saved)
    with pytest.raises(ValueError, match="batch_size"):
        data.dataset_iterator(small_docs, seq_len=8, batch_size=8, seed=3).restore(saved)


@pytest.mark.parametrize("source", ["tokens", "synthetic"])
def test_process_sharding(small_docs, source):
    def make(p, count):
        if source == "synthetic":
            return data.synthetic("copy", 64, 8, seed=0, batch_size=8, process_index=p, process_count=count)
        return data.dataset_iterator(small_docs, seq_len=8, batch_size=8, seed=0, process_index=p,
                                     process_count=count)

    whole = make(0, 1)
    for count in (2, 4):
        procs = [make(p, count) for p in range(count)]
        for step in range(3):
            local = [pr.batch(step) for pr in procs]
            assert all(b["tokens"].shape == (8 // count, 8) for b in local)
            assert _equal(_stack(local), whole.batch(step))  # disjoint blocks in process order = global batch
    # restoring onto a different process count continues the same global batches
    state = whole.restore({"step": 7, "seed": 0, "batch_size": 8}).state()
    halves = [make(p, 2).restore(state) for p in range(2)]
    assert _equal(_stack([next(h) for h in halves]), next(whole))
    with pytest.raises(ValueError, match="multiple of process_count"):
        make(0, 3)
    with pytest.raises(ValueError, match="process_index"):
        make(4, 4)


def test_eval_split_is_held_out(small_docs):
    total = data.num_rows(small_docs.num_tokens, 8)
    train, held = data.split_rows(total, "train"), data.split_rows(total, "eval")
    assert train[1] + held[1] == total and held == (train[1], max(1, round(total * data.EVAL_FRACTION)))
    ev = data.dataset_iterator(small_docs, seq_len=8, batch_size=2, seed=0, split="eval")
    assert ev.rows_per_epoch == held[1]


def test_synthetic_tasks():
    it = data.synthetic("copy", 512, 15, seed=0, batch_size=4, symbols=32)
    b = next(it)
    row = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)  # 16 tokens: 8 + the same 8
    np.testing.assert_array_equal(row[:, :8], row[:, 8:])
    assert row.max() < 32
    np.testing.assert_array_equal(b["loss_mask"][0], (np.arange(1, 16) >= 8).astype(np.int32))
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    assert (b["segment_ids"] == 1).all() and (b["positions"] == np.arange(15)).all()

    c = data.synthetic("counting", 16, 32, seed=0, batch_size=4).batch(0)
    np.testing.assert_array_equal(c["targets"], (c["tokens"] + 1) % 16)
    assert (c["loss_mask"] == 1).all() and c["tokens"].dtype == np.int32

    same, other = data.synthetic("copy", 512, 15, seed=0, batch_size=4, symbols=32), \
        data.synthetic("copy", 512, 15, seed=1, batch_size=4, symbols=32)
    assert _equal(same.batch(0), b) and not _equal(other.batch(0), b)
    ev = data.synthetic("copy", 512, 15, seed=0, batch_size=4, symbols=32, split="eval")
    assert not _equal(ev.batch(0), b)

    cfg = TrainConfig(data="synthetic:counting:8", seq_len=12, batch_size=2)
    d = next(data.make_dataset(cfg, 512))
    assert d["tokens"].shape == (2, 12) and d["tokens"].max() < 8
    for bad in ("synthetic:reverse", "synthetic:copy:x"):
        with pytest.raises(ValueError, match="synthetic"):
            data.make_dataset(TrainConfig(data=bad), 512)


def test_stdlib_corpus(tmp_path, monkeypatch):
    files = data.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and files == sorted(files, key=lambda p: p.relative_to(root).as_posix())
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    names = {p.name for p in files}
    assert {"os.py", "sysconfig.py", "__init__.py"} <= names
    subset = [f for f in files if f.name in ("os.py", "glob.py", "fnmatch.py", "shlex.py")]
    monkeypatch.setattr(data, "stdlib_files", lambda: subset)
    cfg = TrainConfig(data="stdlib", seq_len=64, batch_size=4)
    it = data.make_dataset(cfg, 512, cache_dir=tmp_path)
    (cached,) = [p for p in tmp_path.iterdir()]
    assert cached.name.startswith("stdlib-py") and (cached / "metadata.json").is_file()
    b = next(it)
    assert b["tokens"].shape == (4, 64) and b["tokens"].max() < 259
    mtime = (cached / "metadata.json").stat().st_mtime_ns
    again = data.make_dataset(cfg, 512, cache_dir=tmp_path)  # reuses the cache, same batches
    assert (cached / "metadata.json").stat().st_mtime_ns == mtime and _equal(again.batch(0), b)
    meta = json.loads((cached / "metadata.json").read_text())
    assert meta["sources"] == [str(f) for f in subset if f.stat().st_size]
    with pytest.raises(ValueError, match="vocab_size is 256"):
        data.make_dataset(cfg, 256, cache_dir=tmp_path)


def test_bad_inputs(tmp_path, corpus):
    path, meta = corpus
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.TokenDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_dataset(TrainConfig(data=str(tmp_path / "missing")), 512)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        data.TokenDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.prepare([tmp_path / "nope.txt"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.prepare([str(tmp_path / "*.nothing")], tmp_path / "out")
    with pytest.raises(ValueError, match="model's vocab_size is 200"):
        data.TokenDataset(path, 200)
    # a token id >= vocab_size in a shard: the file and the id are named
    shard = path / "tokens-00000.bin"
    tokens = np.fromfile(shard, np.uint16)
    tokens[5] = 300
    tokens.tofile(shard)
    with pytest.raises(ValueError, match=r"tokens-00000\.bin: token id 300 >= vocab_size 259"):
        data.TokenDataset(path)
    with pytest.raises(ValueError, match=r"tokens-00000\.bin: token id 300 >= vocab_size 280"):
        data.TokenDataset(path, 280)
    assert data.TokenDataset(path, 512).num_tokens == meta["num_tokens"]
    tokens[:-1].tofile(shard)  # truncated shard
    with pytest.raises(ValueError, match="bytes"):
        data.TokenDataset(path)


def test_cli(tmp_path, capsys):
    from train import prepare as cli

    src = _write(tmp_path / "src")
    assert cli.main(["--out", str(tmp_path / "tok"), str(src)]) == 0
    out = capsys.readouterr().out
    assert "4 documents" in out and "uint16" in out
    assert data.TokenDataset(tmp_path / "tok").num_documents == 4

    for argv in (["--out", str(tmp_path / "x"), str(tmp_path / "missing.txt")],
                 ["--out", str(tmp_path / "tok"), str(src)],  # not empty
                 ["--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nope.json"), str(src)],
                 ["--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m train.prepare: error: "), err
