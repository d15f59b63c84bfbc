"""Training data: tokenizers, token shards, packing, a deterministic sharded batch pipeline, synthetic tasks.

Pieces, bottom up:

- Tokenizers. `ByteTokenizer`: ids 0..255 are the bytes of the text, then `BYTE_EOS_ID = 256`,
  `BYTE_PAD_ID = 257`, `BYTE_BOS_ID = 258`; `vocab_size == 259`. `HFTokenizer(path)` wraps a local
  `tokenizer.json` (the `tokenizers` library) and finds its EOS / BOS / PAD tokens by their usual names (or is told
  them). `load_tokenizer("bytes" | path)` picks one. A model's `vocab_size` must be >= the tokenizer's.
- Token shards. `prepare(inputs, out_dir, tokenizer)` turns text files (files, directories, globs; one file = one
  document) into `tokens-00000.bin`, ... (raw little-endian uint16 when the vocabulary fits in 16 bits, else uint32)
  and `metadata.json` (dtype, vocab size, tokenizer, special ids, token / document counts, per-shard counts and
  document ends). Each document is stored as `[BOS] + ids + [EOS]` (no BOS where the tokenizer has none), so the
  shards concatenated are the training stream. Every file is written as `name.tmp` and renamed; `metadata.json`
  comes last, so a directory without it is an unfinished one. `TokenDataset(dir, vocab_size)` memory-maps the shards
  and validates them on open (missing directory or files, sizes, token ids >= vocab_size, EOS at document ends).
- The default corpus, `data="stdlib"`: the `.py` files of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`, site-packages excluded), sorted by relative path, prepared once into a cache
  directory (`$V4JAX_CACHE`, default `~/.cache/v4jax`) keyed by the file list and the tokenizer. No download.
- Packing. The stream is cut into rows of `seq_len + 1` tokens with stride `seq_len` (consecutive rows overlap by
  one token, so every next-token transition is trained once); the last row is padded with PAD. A row gives
  `tokens = row[:-1]`, `targets = row[1:]` and
  `segment_ids`: 1-based document number within the row (1, 2, ...), a new one starting right after each EOS (the
  EOS belongs to the document it ends); 0 marks padding. A row that starts mid-document starts with segment 1.
  `positions`: 0, 1, ... restarting at every segment start (also 0 at the start of a row that begins mid-document).
  `loss_mask`: 1 where the target is in the same segment as the input token and is not padding, i.e. 0 where the
  input is an EOS (its target is the next document's first token) and wherever the target is padding.
  Batches are dicts of numpy int32 arrays, each [local_batch, seq_len]:
  `tokens, targets, segment_ids, positions, loss_mask`.
- Order. Global row `r` (of the infinite stream of rows) is row `perm_e[r mod N]` of the corpus, `e = r // N`,
  where `perm_e` is a seeded permutation of the N packed rows, different per epoch. Global batch `k` is rows
  `[k*B, (k+1)*B)`; process `p` of `P` gets the contiguous block `[k*B + p*B/P, k*B + (p+1)*B/P)`, so the
  processes' batches are disjoint, cover the global batch, and concatenated in process order they are the same
  global batch for any `P`. Batch `k` is therefore a pure function of (data, seq_len, batch_size, seed, k); the
  iterator's state is the dict `{"step", "epoch", "seed", "batch_size", ...}` (`state()` / `restore(state)`), small
  enough to save next to a checkpoint as JSON, and resuming at step k reproduces exactly.
- Synthetic tasks (`data="synthetic:<task>[:<symbols>]"`): "copy" (the row's second half repeats its first half;
  loss only on the predictable second half) and "counting" (next = previous + 1 mod symbols), in the same batch
  format, each row seeded by (seed, row), so any process count sees the same global batches. The long-range
  ablation tasks of `v4jax.ablation.tasks` ("synthetic:mqar:pairs=8", "synthetic:passkey", "synthetic:induction")
  come through the same door.

Grain: the index pipeline is a `grain.MapDataset` (random access, so batch `k` is computed, never replayed):
`MapDataset.source(packed rows).shuffle(seed).repeat()` (grain's shuffle re-permutes each epoch with
`seed + epoch`; the seed passed to it is a hash of the run seed, so run seeds s and s+1 don't share epochs)
`.batch(B/P).slice(p::P)`. Grain's own `DatasetIterator` (with its `get_state`/`set_state` and orbax handler) is
not used: indexing the MapDataset by step makes the state a plain step counter that survives a change of process
count, and the thin `DataIterator` below adds optional thread prefetching without putting prefetched-but-unused
batches into the state.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_BOS_ID = 258
BYTE_VOCAB_SIZE = 259

FORMAT = "v4jax-tokens"
FORMAT_VERSION = 1
METADATA = "metadata.json"
SHARD_PATTERN = "tokens-{:05d}.bin"
DEFAULT_SHARD_TOKENS = 1 << 27
EVAL_FRACTION = 0.01  # of the packed rows, held out at the end of the stream for split="eval"
SYNTHETIC_TASKS = ("copy", "counting")
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; EOS = 256, PAD = 257, BOS = 258; vocab_size = 259."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS_ID
    pad_id = BYTE_PAD_ID
    bos_id = BYTE_BOS_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "bytes"}

    def __repr__(self):
        return "ByteTokenizer()"


_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`. EOS / BOS / PAD are found by their usual names unless given (as token
    strings); EOS is required, BOS is optional (None: documents get no BOS), PAD defaults to EOS."""

    def __init__(self, path: str | os.PathLike, *, eos: str | None = None, bos: str | None = None,
                 pad: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path).expanduser().resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust error text is useful but can be long; keep one line
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers library can load "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._special(eos, _EOS_NAMES, "EOS", required=True)
        self.bos_id = self._special(bos, _BOS_NAMES, "BOS", required=False)
        pad_id = self._special(pad, _PAD_NAMES, "PAD", required=False)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _special(self, given, names, what, required):
        if given is not None:
            token_id = self._tok.token_to_id(given)
            if token_id is None:
                raise ValueError(f"{self.path}: {what} token {given!r} is not in the vocabulary")
            return int(token_id)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        if required:
            specials = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
            raise ValueError(f"{self.path}: no {what} token among {list(names)}; name it explicitly "
                             f"(special tokens present: {specials[:20]})")
        return None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "path": str(self.path), "sha256": self.sha256}

    def __repr__(self):
        return f"HFTokenizer({str(self.path)!r})"


def load_tokenizer(spec: str | Tokenizer) -> Tokenizer:
    """`"bytes"` -> ByteTokenizer; a path to a `tokenizer.json` -> HFTokenizer; a tokenizer object is returned."""
    if not isinstance(spec, str):
        return spec
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def check_vocab(tokenizer_vocab: int, model_vocab: int, what: str = "tokenizer"):
    if tokenizer_vocab > model_vocab:
        raise ValueError(f"{what} has {tokenizer_vocab} token ids but the model's vocab_size is {model_vocab}; "
                         f"use a model with vocab_size >= {tokenizer_vocab}")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------------------
# prepare: text files -> token shards


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """Files, directories (recursive; hidden names skipped) and globs -> [(file, named_explicitly)], in order given,
    each directory / glob sorted. Raises FileNotFoundError for a missing path or a glob that matches nothing."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given")
    files: list[tuple[Path, bool]] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            files.extend((f, False) for f in _walk(path))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {text!r}")
            for match in matches:
                match = Path(match)
                if match.is_file():
                    files.append((match, True))
                elif match.is_dir():
                    files.extend((f, False) for f in _walk(match))
        else:
            raise FileNotFoundError(f"no such file or directory: {text!r}")
    return files


def _walk(root: Path, suffix: str | None = None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no cycles, deterministic
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and (suffix is None or name.endswith(suffix)):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _documents(files, tokenizer, skipped: list[str], group: int = 64):
    """Yield (source, ids) for each non-empty document; directory files that are not UTF-8 are skipped."""
    batch: list[tuple[str, bytes]] = []

    def flush():
        if hasattr(tokenizer, "encode_batch"):
            encoded = tokenizer.encode_batch([data.decode("utf-8", errors="replace") for _, data in batch])
        else:
            encoded = [tokenizer.encode(data) for _, data in batch]
        yield from zip((name for name, _ in batch), encoded)
        batch.clear()

    for path, explicit in files:
        data = path.read_bytes()
        if not data:
            skipped.append(str(path))
            continue
        if not explicit:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(str(path))
                continue
        batch.append((str(path), data))
        if len(batch) >= group:
            yield from flush()
    if batch:
        yield from flush()


def prepare(inputs: Sequence[str | os.PathLike] | str, out_dir: str | os.PathLike,
            tokenizer: str | Tokenizer = "bytes", *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            overwrite: bool = False) -> dict[str, Any]:
    """Tokenize text files into `out_dir/tokens-NNNNN.bin` + `out_dir/metadata.json`; returns the metadata.

    One file is one document, stored as `[BOS] + ids + [EOS]`. A new shard starts once the current one holds at
    least `shard_tokens` tokens (documents never straddle shards). Empty files, and files found by walking a
    directory that are not valid UTF-8, are skipped (counted in `metadata["skipped"]`). `out_dir` must be empty or
    absent unless `overwrite` (which replaces a previous preparation's files).
    """
    tokenizer = load_tokenizer(tokenizer)
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
    files = resolve_inputs(inputs)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if not p.name.endswith(".tmp")]
    if existing:
        ours = all(p.name == METADATA or (p.name.startswith("tokens-") and p.name.endswith(".bin"))
                   for p in existing)
        if not (overwrite and ours):
            raise FileExistsError(f"output directory {str(out)!r} is not empty"
                                  + ("" if ours else " (and holds files other than token shards)")
                                  + ("" if overwrite else "; pass overwrite=True / --force to replace it"))
        (out / METADATA).unlink(missing_ok=True)  # the directory is now marked unfinished

    dtype = _token_dtype(tokenizer.vocab_size)
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    shards: list[dict[str, Any]] = []
    skipped: list[str] = []
    sources: list[str] = []
    state = {"handle": None, "tokens": 0, "ends": [], "max_id": 0}

    def close_shard():
        if state["handle"] is None:
            return
        state["handle"].close()
        name = SHARD_PATTERN.format(len(shards))
        os.replace(out / (name + ".tmp"), out / name)
        shards.append({"file": name, "num_tokens": state["tokens"], "num_documents": len(state["ends"]),
                       "document_ends": state["ends"]})
        state.update(handle=None, tokens=0, ends=[])

    try:
        for source, ids in _documents(files, tokenizer, skipped):
            if ids.size == 0:
                skipped.append(source)
                continue
            top = int(ids.max())
            if top >= tokenizer.vocab_size or int(ids.min()) < 0:
                raise ValueError(f"{source}: tokenizer produced id {top} outside [0, {tokenizer.vocab_size})")
            if state["handle"] is None:
                state["handle"] = open(out / (SHARD_PATTERN.format(len(shards)) + ".tmp"), "wb")
            doc = np.concatenate([np.asarray(head, np.int64), ids, [tokenizer.eos_id]]).astype(dtype)
            state["handle"].write(doc.astype(doc.dtype.newbyteorder("<"), copy=False).tobytes())
            state["tokens"] += doc.size
            state["ends"].append(state["tokens"])
            state["max_id"] = max(state["max_id"], top, tokenizer.eos_id, *head)
            sources.append(source)
            if state["tokens"] >= shard_tokens:
                close_shard()
        close_shard()
    finally:
        if state["handle"] is not None:
            state["handle"].close()
            (out / (SHARD_PATTERN.format(len(shards)) + ".tmp")).unlink(missing_ok=True)
    if not shards:
        raise ValueError(f"no documents: all {len(files)} input files were empty or skipped")
    for stale in out.glob("tokens-*.bin"):
        if stale.name not in {s["file"] for s in shards}:
            stale.unlink()

    metadata = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "dtype": dtype.name, "byteorder": "little",
        "vocab_size": int(tokenizer.vocab_size), "tokenizer": tokenizer.spec(),
        "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id),
        "bos_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "max_token_id": int(state["max_id"]),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
        "shards": shards,
        "sources": sources,
        "skipped": skipped,
    }
    _write_json(out / METADATA, metadata)
    return metadata


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# the stdlib corpus


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files (site-/dist-packages excluded), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _walk(root, ".py")
             if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)]
    return files


def cache_root() -> Path:
    return Path(os.environ.get("V4JAX_CACHE") or Path.home() / ".cache" / "v4jax").expanduser()


def stdlib_corpus(tokenizer: str | Tokenizer = "bytes", *, cache_dir: str | os.PathLike | None = None,
                  files: Sequence[Path] | None = None) -> Path:
    """The prepared token directory of the stdlib corpus (or of `files`), made on first use in the cache.

    Keyed by the file list (paths and sizes) and the tokenizer, so a different Python or tokenizer gets its own
    directory; several processes racing to make it (the hosts of a multi-host run sharing a home directory) each
    prepare into a private temporary directory, named by host and pid, and the first rename wins.
    """
    tokenizer = load_tokenizer(tokenizer)
    files = stdlib_files() if files is None else [Path(f) for f in files]
    if not files:
        raise FileNotFoundError(f"no standard-library .py files under {sysconfig.get_paths()['stdlib']!r}")
    key = hashlib.sha256(json.dumps([tokenizer.spec(), FORMAT_VERSION,
                                     [(str(f), f.stat().st_size) for f in files]]).encode()).hexdigest()[:16]
    name = "bytes" if tokenizer.spec().get("kind") == "bytes" else tokenizer.spec().get("kind", "custom")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{name}-{key}"
    if (target / METADATA).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp"  # pids repeat across hosts
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepare([str(f) for f in files], tmp, tokenizer)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first (or left a broken directory)
            if not (target / METADATA).is_file():
                shutil.rmtree(target, ignore_errors=True)
                try:
                    os.rename(tmp, target)
                except OSError:  # another process replaced the broken one meanwhile
                    if not (target / METADATA).is_file():
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# reading prepared shards


class TokenDataset:
    """A prepared token directory, memory-mapped, as one concatenated stream of tokens.

    Validated on open: the directory and `metadata.json` exist and match this format; every shard exists with the
    size the metadata says; the tokenizer's vocabulary fits `vocab_size` (when given); no token id is
    >= `vocab_size` (or the metadata's vocab size), checked by scanning the shards unless `check_tokens=False`;
    each document ends with EOS.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None, *, check_tokens: bool = True):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"token directory {str(path)!r} does not exist "
                                    f"(make one with: python -m train.prepare --out {path} FILES...)")
        if not self.path.is_dir():
            raise NotADirectoryError(f"token directory {str(path)!r} is not a directory")
        meta_path = self.path / METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no {METADATA}: not a prepared token directory, or its "
                                    f"preparation did not finish (python -m train.prepare --out {path} FILES...)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not {FORMAT} metadata")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta.get('version')}, this code reads {FORMAT_VERSION}")
        self.metadata = meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.vocab_size = int(meta["vocab_size"])  # the tokenizer's
        self.eos_id, self.pad_id = int(meta["eos_id"]), int(meta["pad_id"])
        self.bos_id = None if meta.get("bos_id") is None else int(meta["bos_id"])
        if vocab_size is not None:
            check_vocab(self.vocab_size, vocab_size, f"the tokenizer of {str(path)!r}")
        limit = self.vocab_size if vocab_size is None else int(vocab_size)

        self.shards: list[np.ndarray] = []
        offsets = [0]
        for shard in meta["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard listed in {METADATA} is missing")
            expected = int(shard["num_tokens"]) * self.dtype.itemsize
            if file.stat().st_size != expected:
                raise ValueError(f"{file}: {file.stat().st_size} bytes, {METADATA} says {expected} "
                                 f"({shard['num_tokens']} x {self.dtype.name})")
            tokens = np.memmap(file, self.dtype, mode="r")
            if check_tokens:
                _check_ids(tokens, limit, file)
            ends = np.asarray(shard["document_ends"], np.int64)
            if ends.size and (ends[-1] != tokens.size or np.any(tokens[ends - 1] != self.eos_id)):
                raise ValueError(f"{file}: documents do not end with EOS id {self.eos_id} where {METADATA} says")
            self.shards.append(tokens)
            offsets.append(offsets[-1] + tokens.size)
        self.offsets = np.asarray(offsets, np.int64)
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens != meta["num_tokens"]:
            raise ValueError(f"{meta_path}: num_tokens {meta['num_tokens']} but the shards hold {self.num_tokens}")
        if self.num_tokens == 0:
            raise ValueError(f"{str(path)!r} holds no tokens")
        self.num_documents = int(meta["num_documents"])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream, as int32."""
        start, stop = max(0, start), min(stop, self.num_tokens)
        if stop <= start:
            return np.zeros(0, np.int32)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            base = int(self.offsets[first])
            take = min(stop, int(self.offsets[first + 1]))
            parts.append(self.shards[first][start - base:take - base])
            start, first = take, first + 1
        return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)

    def document(self, index: int) -> np.ndarray:
        """Document `index` as stored ([BOS] + ids + [EOS])."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} of {self.num_documents}")
        for shard_index, shard in enumerate(self.metadata["shards"]):
            if index < shard["num_documents"]:
                ends = shard["document_ends"]
                start = 0 if index == 0 else ends[index - 1]
                base = int(self.offsets[shard_index])
                return self.tokens(base + start, base + ends[index])
            index -= shard["num_documents"]
        raise AssertionError("unreachable")

    def __repr__(self):
        return f"TokenDataset({str(self.path)!r}, {self.num_tokens} tokens, {self.num_documents} documents)"


def _check_ids(tokens: np.ndarray, limit: int, file: Path, block: int = 1 << 26):
    for start in range(0, tokens.size, block):
        part = tokens[start:start + block]
        top = int(part.max())
        if top >= limit:
            offset = start + int(np.argmax(part >= limit))
            raise ValueError(f"{file}: token id {top} >= vocab_size {limit} (first bad id "
                             f"{int(tokens[offset])} at token {offset})")


# ---------------------------------------------------------------------------------------------------------------
# packing


def pack_row(row: np.ndarray, eos_id: int, num_valid: int | None = None) -> dict[str, np.ndarray]:
    """One row of `seq_len + 1` stream tokens (the first `num_valid` real, the rest padding) -> the batch fields
    for one sequence of length seq_len (see the module docstring for their meaning)."""
    row = np.asarray(row, np.int32)
    n = row.size
    num_valid = n if num_valid is None else num_valid
    index = np.arange(n)
    valid = index < num_valid
    is_eos = (row == eos_id) & valid
    starts_segment = np.concatenate([[True], is_eos[:-1]])
    segment = np.where(valid, np.cumsum(starts_segment), 0)
    segment_start = np.maximum.accumulate(np.where(starts_segment, index, 0))
    positions = np.where(valid, index - segment_start, 0)
    return {
        "tokens": row[:-1],
        "targets": row[1:],
        "segment_ids": segment[:-1].astype(np.int32),
        "positions": positions[:-1].astype(np.int32),
        "loss_mask": ((segment[:-1] == segment[1:]) & valid[1:]).astype(np.int32),
    }


class PackedRows(Sequence):
    """Rows `first .. first+count-1` of a token stream cut into `seq_len + 1`-token rows with stride `seq_len`."""

    def __init__(self, dataset: TokenDataset, seq_len: int, first: int = 0, count: int | None = None):
        self.dataset, self.seq_len = dataset, int(seq_len)
        total = num_rows(dataset.num_tokens, seq_len)
        self.first = int(first)
        self.count = total - self.first if count is None else int(count)
        if self.first < 0 or self.count <= 0 or self.first + self.count > total:
            raise ValueError(f"rows [{self.first}, {self.first + self.count}) outside the {total} rows")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        start = (self.first + index % self.count) * self.seq_len
        row = self.dataset.tokens(start, start + self.seq_len + 1)
        num_valid = row.size
        if num_valid < self.seq_len + 1:
            row = np.concatenate([row, np.full(self.seq_len + 1 - num_valid, self.dataset.pad_id, np.int32)])
        return pack_row(row, self.dataset.eos_id, num_valid)


def num_rows(num_tokens: int, seq_len: int) -> int:
    """Packed rows of a stream of `num_tokens` (stride seq_len, the last one padded)."""
    return max(1, -(-(num_tokens - 1) // seq_len))


def split_rows(total: int, split: str) -> tuple[int, int]:
    """(first, count) of the rows of `split`: "train" all but the last EVAL_FRACTION (at least one row), "eval"
    those; a corpus of a single row is both."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if total == 1:
        return 0, 1
    held_out = max(1, round(total * EVAL_FRACTION))
    return (0, total - held_out) if split == "train" else (total - held_out, held_out)


# ---------------------------------------------------------------------------------------------------------------
# synthetic tasks


class SyntheticRows(Sequence):
    """An endless sequence of synthetic rows; row `r` depends only on (task, symbols, seq_len, seed, split, r).

    "copy": h = ceil((seq_len + 1) / 2) random symbols, then the same symbols again (truncated to seq_len + 1);
      loss only where the target is in the repeat (predictable).
    "counting": a random start s, then s+1, s+2, ... mod symbols; loss everywhere.
    One segment per row (segment_ids 1, positions 0..seq_len-1). Symbols are ids [0, symbols).
    """

    def __init__(self, task: str, symbols: int, seq_len: int, seed: int, split: str = "train"):
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
        if symbols < 2:
            raise ValueError(f"synthetic task needs at least 2 symbols, got {symbols}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.task, self.symbols, self.seq_len, self.seed = task, int(symbols), int(seq_len), int(seed)
        self._key = (SYNTHETIC_TASKS.index(task), ("train", "eval").index(split))

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, *self._key, int(index)])
        n, t = self.seq_len + 1, self.seq_len
        if self.task == "copy":
            half = -(-n // 2)
            first = rng.integers(0, self.symbols, half, dtype=np.int64)
            row = np.concatenate([first, first])[:n]
            loss_mask = (np.arange(1, n) >= half)
        else:
            row = (rng.integers(0, self.symbols) + np.arange(n)) % self.symbols
            loss_mask = np.ones(t, bool)
        row = row.astype(np.int32)
        return {"tokens": row[:-1], "targets": row[1:], "segment_ids": np.ones(t, np.int32),
                "positions": np.arange(t, dtype=np.int32), "loss_mask": loss_mask.astype(np.int32)}


# ---------------------------------------------------------------------------------------------------------------
# the batch pipeline


def _shuffle_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed) & (2**64 - 1), 0x76346A6178]).generate_state(1)[0])


class DataIterator:
    """Batches of one process: `next(it)` gives the batch at `it.step` and advances; `it.batch(k)` gives batch k
    without moving. State: `state()` -> small JSON-able dict; `restore(state)` resumes from it (the process count
    may differ; seed and global batch size must match)."""

    def __init__(self, rows: Sequence, *, seed: int, batch_size: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, name: str = "", prefetch: int = 0,
                 metadata: dict[str, Any] | None = None):
        import grain

        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} must be a positive multiple of process_count "
                             f"{process_count}")
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.name, self.metadata = name, dict(metadata or {})
        self.rows_per_epoch = len(rows) if len(rows) < sys.maxsize else None
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed=_shuffle_seed(seed))
        if self.rows_per_epoch is not None:
            ds = ds.repeat()
        self._batches = ds.batch(self.local_batch_size).slice(slice(process_index, None, process_count))
        self.step = 0
        self._prefetch = int(prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if self._prefetch > 0 else None
        self._pending: dict[int, concurrent.futures.Future] = {}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        return self._batches[int(step)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step = self.step
        if self._pool is None:
            out = self.batch(step)
        else:
            for k in range(step, step + self._prefetch + 1):
                if k not in self._pending:
                    self._pending[k] = self._pool.submit(self.batch, k)
            out = self._pending.pop(step).result()
        self.step = step + 1
        return out

    @property
    def epoch(self) -> int:
        if self.rows_per_epoch is None:
            return 0
        return self.step * self.batch_size // self.rows_per_epoch

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size,
                "data": self.name, "version": FORMAT_VERSION}

    def restore(self, state: dict[str, Any]) -> DataIterator:
        for key in ("seed", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"data iterator state has {key}={state[key]} but this pipeline has "
                                 f"{key}={getattr(self, key)}; resuming would not reproduce the batches")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"data iterator state has step={step}")
        self._pending.clear()
        self.step = step
        return self

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __repr__(self):
        return (f"DataIterator({self.name!r}, step={self.step}, batch={self.local_batch_size}/{self.batch_size}, "
                f"process {self.process_index}/{self.process_count})")


def dataset_iterator(dataset: TokenDataset, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1, split: str = "train", name: str | None = None,
                     prefetch: int = 0) -> DataIterator:
    """Shuffled packed batches of a TokenDataset (the rows of `split`)."""
    first, count = split_rows(num_rows(dataset.num_tokens, seq_len), split)
    rows = PackedRows(dataset, seq_len, first, count)
    return DataIterator(rows, seed=seed, batch_size=batch_size, process_index=process_index,
                        process_count=process_count, name=name or str(dataset.path), prefetch=prefetch,
                        metadata={"eos_id": dataset.eos_id, "pad_id": dataset.pad_id, "bos_id": dataset.bos_id,
                                  "tokenizer": dataset.metadata["tokenizer"], "rows": count})


def synthetic(task: str, vocab_size: int, seq_len: int, seed: int, *, batch_size: int = 8, symbols: int | None = None,
              process_index: int = 0, process_count: int = 1, split: str = "train") -> DataIterator:
    """Batches of a synthetic task ("copy", "counting") over ids [0, symbols or vocab_size)."""
    symbols = vocab_size if symbols is None else symbols
    if symbols > vocab_size:
        raise ValueError(f"synthetic task uses {symbols} symbols but the model's vocab_size is {vocab_size}")
    rows = SyntheticRows(task, symbols, seq_len, seed, split)
    return DataIterator(rows, seed=seed, batch_size=batch_size, process_index=process_index,
                        process_count=process_count, shuffle=False, name=f"synthetic:{task}:{symbols}")


def make_dataset(train_cfg, vocab_size: int, process_index: int = 0, process_count: int = 1, *,
                 split: str = "train", cache_dir: str | os.PathLike | None = None,
                 prefetch: int = 0) -> DataIterator:
    """The batch iterator a run's `TrainConfig` asks for: `data` = "stdlib", a prepared token directory, or
    "synthetic:<task>[:<symbols>]"; global batch `train_cfg.batch_size` of `train_cfg.seq_len` tokens, order from
    `train_cfg.seed`. `vocab_size` is the model's."""
    data, seq_len, batch_size, seed = train_cfg.data, train_cfg.seq_len, train_cfg.batch_size, train_cfg.seed
    if data.startswith("synthetic:") and data.split(":")[1] not in SYNTHETIC_TASKS:  # an ablation task
        from v4jax.ablation import tasks

        name = data.split(":")[1]
        if name not in list(tasks.TaskKind):
            raise ValueError(f"data {data!r}: unknown synthetic task {name!r}; known: "
                             f"{', '.join([*SYNTHETIC_TASKS, *tasks.TaskKind])}")
        task = tasks.parse(data.removeprefix("synthetic:"))
        check_vocab(task.vocab_size, vocab_size, f"task {data!r}")
        return DataIterator(tasks.TaskRows(task, seq_len, seed, split), seed=seed, batch_size=batch_size,
                            process_index=process_index, process_count=process_count, shuffle=False, name=data)
    if data.startswith("synthetic:"):
        parts = data.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"data {data!r}: expected synthetic:<task> or synthetic:<task>:<symbols>")
        symbols = int(parts[2]) if len(parts) == 3 else None
        return synthetic(parts[1], vocab_size, seq_len, seed, batch_size=batch_size, symbols=symbols,
                         process_index=process_index, process_count=process_count, split=split)
    tokenizer = load_tokenizer(train_cfg.tokenizer)
    check_vocab(tokenizer.vocab_size, vocab_size, f"tokenizer {train_cfg.tokenizer!r}")
    if data == "stdlib":
        path = stdlib_corpus(tokenizer, cache_dir=cache_dir)
        name = "stdlib"
    else:
        path, name = Path(data), data
    dataset = TokenDataset(path, vocab_size)
    _check_same_tokenizer(dataset, tokenizer, data, train_cfg.tokenizer)
    return dataset_iterator(dataset, seq_len=seq_len, batch_size=batch_size, seed=seed, process_index=process_index,
                            process_count=process_count, split=split, name=name, prefetch=prefetch)


def _check_same_tokenizer(dataset: TokenDataset, tokenizer: Tokenizer, data: str, spec: str):
    stored, wanted = dataset.metadata["tokenizer"], tokenizer.spec()
    if stored.get("kind") != wanted.get("kind") or stored.get("sha256") != wanted.get("sha256"):
        raise ValueError(f"data {data!r} was prepared with tokenizer {stored.get('path') or stored.get('kind')!r} "
                         f"but train.tokenizer is {spec!r}; set train.tokenizer to the one used by prepare")
