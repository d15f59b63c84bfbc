"""Long-range synthetic tasks that separate full attention from local attention, with exact-match metrics.

Each task writes examples as one stream of `seq_len + 1` token ids plus the target positions it scores, and
trains through the ordinary batch pipeline: `train.data = "synthetic:<task>[:key=value,...]"` (e.g.
`synthetic:mqar:pairs=8,stride=4`) gives `TaskRows` in the batch format of `training/data.py` with `loss_mask` on
the answers only. Row r of a split depends only on (task, seq_len, seed, split, r).

- MQAR (multi-query associative recall, beyond the window): `pairs` key-value pairs at the start, one pair every
  `stride` tokens (blanks between), blanks, then every key again in a random order, each followed by its value.
  The model must emit each value after its key. Every query is at least `gap(seq_len)` tokens after its pair; with
  `gap > layers * window`, stacked local layers cannot relay the value (each hop moves it at most window - 1
  tokens), so only a full (or compressed) layer can. Values are drawn with replacement, so seeing the other
  answers does not narrow down the next one. Chance: 1 / values. `bound=True` stores each pair as one token (its
  own id per (key, value), like a phonebook line): recall is then one attention hop instead of a previous-token
  head feeding a lookup, which small models learn in far fewer steps.
- Passkey: a filler "sentence" repeated, a key marker and `digits` digits at a relative depth, filler, then a
  query marker after which the model must repeat the digits. One item = the whole key (all digits right).
  Training draws the depth uniformly; evaluation reports each of `depths` (0 = the start of the row, 1 = just
  before the query) separately, so short-range depths show what local layers can still do. Chance: 10^-digits.
- Induction (the Mamba paper's setup): random symbols with a trigger token placed once in the row followed by a
  symbol, and the trigger again at the end: the model must produce the symbol that followed the first trigger.
  Evaluation also runs at `test_lengths` beyond the training length. Chance: 1 / symbols.

Exact match: an item is the `item_size` consecutive scored targets of one answer (1 for MQAR and induction,
`digits` for passkey); it counts as right only when the arg-max prediction is right at all of them.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "eval")


class TaskKind(enum.StrEnum):
    MQAR = "mqar"
    PASSKEY = "passkey"
    INDUCTION = "induction"


@dataclasses.dataclass(frozen=True)
class Example:
    stream: np.ndarray  # int32 [seq_len + 1]: tokens = stream[:-1], targets = stream[1:]
    scored: np.ndarray  # bool [seq_len]: the target positions that form the answers
    group: str = ""  # the evaluation breakdown this example belongs to ("depth=0.5"); "" for none


@dataclasses.dataclass(frozen=True)
class Mqar:
    pairs: int = 4
    keys: int = 16  # key alphabet (ids 1..keys); at least `pairs`, since a row's keys are distinct
    values: int = 16  # value alphabet (ids keys+1..keys+values)
    stride: int = 2  # tokens per pair slot in the context: key, value, stride-2 blanks
    bound: bool = False  # store each pair as one token (id of the pair), as a phonebook line
    kind = TaskKind.MQAR
    item_size = 1

    def __post_init__(self):
        _check(self.pairs >= 1 and self.values >= 2 and self.keys >= self.pairs and self.stride >= 2 - self.bound,
               f"mqar needs pairs >= 1, keys >= pairs, values >= 2, stride >= 2 (1 when bound); got {self}")

    @property
    def vocab_size(self) -> int:
        bound = self.keys * self.values if self.bound else 0
        return 1 + self.keys + self.values + bound  # 0 is the blank, then keys, values, bound pairs

    def pair_id(self, key, value):
        """The one token of a bound (key, value) pair: ids after the values, key-major."""
        return 1 + self.keys + self.values + (key - 1) * self.values + (value - 1 - self.keys)

    def gap(self, seq_len: int) -> int:
        """Blank tokens between the last pair and the first query: every query is further than this from its key."""
        return seq_len + 1 - self.pairs * self.stride - 2 * self.pairs

    def example(self, rng: np.random.Generator, seq_len: int, split: str) -> Example:
        _check(self.gap(seq_len) >= 0, f"mqar with {self.pairs} pairs at stride {self.stride} needs seq_len >= "
                                       f"{seq_len - self.gap(seq_len)}, got {seq_len}")
        keys = rng.choice(self.keys, self.pairs, replace=False) + 1
        values = rng.integers(0, self.values, self.pairs) + 1 + self.keys
        stream = np.zeros(seq_len + 1, np.int32)
        context = self.pairs * self.stride
        if self.bound:
            stream[0:context:self.stride] = self.pair_id(keys, values)
        else:
            stream[0:context:self.stride], stream[1:context:self.stride] = keys, values
        order = rng.permutation(self.pairs)
        first_query = seq_len + 1 - 2 * self.pairs
        stream[first_query::2], stream[first_query + 1::2] = keys[order], values[order]
        scored = np.zeros(seq_len, bool)
        scored[first_query::2] = True  # the target after each query key is its value
        return Example(stream, scored)


@dataclasses.dataclass(frozen=True)
class Passkey:
    digits: int = 5
    depths: tuple[float, ...] = (0.0, 0.5, 0.9)  # evaluated depths; training draws any depth in [0, 1]
    filler: int = 8  # length of the filler sentence (distinct ids), repeated
    kind = TaskKind.PASSKEY
    key_marker, query_marker, first_filler = 10, 11, 12  # ids 0..9 are the digits

    def __post_init__(self):
        _check(self.digits >= 1 and self.filler >= 1 and all(0 <= d <= 1 for d in self.depths),
               f"passkey needs digits >= 1, filler >= 1, depths in [0, 1]; got {self}")

    @property
    def item_size(self) -> int:
        return self.digits

    @property
    def vocab_size(self) -> int:
        return self.first_filler + self.filler

    def example(self, rng: np.random.Generator, seq_len: int, split: str) -> Example:
        span = self.digits + 1  # a marker and the digits
        room = seq_len + 1 - 2 * span
        _check(room >= 0, f"passkey with {self.digits} digits needs seq_len >= {2 * span - 1}, got {seq_len}")
        depth = rng.uniform() if split == "train" else self.depths[rng.integers(len(self.depths))]
        key = rng.integers(0, 10, self.digits)
        stream = (self.first_filler + np.arange(seq_len + 1) % self.filler).astype(np.int32)
        at = round(depth * room)
        stream[at], stream[at + 1:at + span] = self.key_marker, key
        query = seq_len + 1 - span
        stream[query], stream[query + 1:] = self.query_marker, key
        scored = np.zeros(seq_len, bool)
        scored[query:] = True
        return Example(stream, scored, "" if split == "train" else f"depth={depth:g}")


@dataclasses.dataclass(frozen=True)
class Induction:
    symbols: int = 16
    test_lengths: tuple[int, ...] = ()  # evaluation lengths beyond the training one
    kind = TaskKind.INDUCTION
    item_size = 1

    def __post_init__(self):
        _check(self.symbols >= 2, f"induction needs symbols >= 2, got {self.symbols}")

    @property
    def vocab_size(self) -> int:
        return self.symbols + 1  # the trigger is id `symbols`

    def example(self, rng: np.random.Generator, seq_len: int, split: str) -> Example:
        _check(seq_len >= 3, f"induction needs seq_len >= 3, got {seq_len}")
        stream = rng.integers(0, self.symbols, seq_len + 1).astype(np.int32)
        at = rng.integers(0, seq_len - 2)  # the first trigger and its symbol end before the final trigger
        stream[at], stream[-2], stream[-1] = self.symbols, self.symbols, stream[at + 1]
        scored = np.zeros(seq_len, bool)
        scored[-1] = True
        return Example(stream, scored)


Task = Mqar | Passkey | Induction
TASKS: dict[TaskKind, type] = {TaskKind.MQAR: Mqar, TaskKind.PASSKEY: Passkey, TaskKind.INDUCTION: Induction}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------------------------
# naming: "mqar:pairs=8,stride=4" <-> Mqar(pairs=8, stride=4)


def parse(spec: str) -> Task:
    """`"mqar"`, `"passkey:digits=3,depths=0/0.5/1"`, `"induction:test_lengths=512/1024"` -> a task; tuple fields
    take `/`-separated values. Raises ValueError (one line) for an unknown task, field or value."""
    name, _, options = spec.partition(":")
    try:
        cls = TASKS[TaskKind(name)]
    except ValueError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TaskKind)}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"task {spec!r}: expected key=value with key in {sorted(fields)}, got {item!r}")
        default = fields[key].default
        try:
            if isinstance(default, tuple):  # "tuple[int, ...]" or "tuple[float, ...]"
                element = int if "int" in str(fields[key].type) else float
                kwargs[key] = tuple(element(v) for v in value.split("/"))
            elif isinstance(default, bool):
                kwargs[key] = {"1": True, "true": True, "0": False, "false": False}[value.lower()]
            else:
                kwargs[key] = type(default)(value)
        except (ValueError, KeyError):
            raise ValueError(f"task {spec!r}: bad value for {key}: {value!r}") from None
    return cls(**kwargs)


def name(task: Task) -> str:
    """The inverse of `parse`: the task kind plus the fields that differ from their defaults."""
    changed = []
    for field in dataclasses.fields(task):
        value = getattr(task, field.name)
        if value != field.default:
            text = ("/".join(f"{v:g}" for v in value) if isinstance(value, tuple) else
                    str(int(value)) if isinstance(value, bool) else str(value))
            changed.append(f"{field.name}={text}")
    return task.kind.value + (":" + ",".join(changed) if changed else "")


# ---------------------------------------------------------------------------------------------------------------
# rows and batches


def example(task: Task, seq_len: int, seed: int, split: str, index: int) -> Example:
    """Example `index` of `split`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([int(seed), list(TaskKind).index(task.kind), SPLITS.index(split), int(index)])
    return task.example(rng, seq_len, split)


def pack(ex: Example) -> dict[str, np.ndarray]:
    """The batch fields of one example (one segment; loss on the scored targets only)."""
    t = ex.scored.size
    return {"tokens": ex.stream[:-1], "targets": ex.stream[1:], "segment_ids": np.ones(t, np.int32),
            "positions": np.arange(t, dtype=np.int32), "loss_mask": ex.scored.astype(np.int32)}


class TaskRows(Sequence):
    """An endless sequence of packed rows of `task` (what `DataIterator` batches)."""

    def __init__(self, task: Task, seq_len: int, seed: int, split: str = "train"):
        self.task, self.seq_len, self.seed, self.split = task, int(seq_len), int(seed), split
        example(task, self.seq_len, self.seed, split, 0)  # bad sizes fail here, before training starts

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        return pack(example(self.task, self.seq_len, self.seed, self.split, index))


# ---------------------------------------------------------------------------------------------------------------
# exact-match scoring


def item_hits(predictions: np.ndarray, ex: Example, item_size: int) -> np.ndarray:
    """bool [items]: whether each answer of `ex` was predicted exactly (predictions int [seq_len], arg-max ids)."""
    scored = np.flatnonzero(ex.scored)
    if scored.size % item_size:
        raise ValueError(f"{scored.size} scored targets do not split into items of {item_size}")
    right = predictions[scored] == ex.stream[1:][scored]
    return right.reshape(-1, item_size).all(axis=1)


def eval_lengths(task: Task, seq_len: int) -> tuple[int, ...]:
    """The training length, then the task's longer test lengths."""
    return (seq_len, *(n for n in getattr(task, "test_lengths", ()) if n != seq_len))


def evaluate(task: Task, predict, seq_len: int, *, seed: int, rows: int = 256, batch: int = 32) -> dict[str, float]:
    """Exact-match accuracy of `predict` (int tokens [b, t] -> arg-max ids [b, t]) on `rows` held-out examples
    at each of `eval_lengths`. Returns {"accuracy": at the training length, "accuracy[<group>]": per group}."""
    hits: dict[str, list[np.ndarray]] = {}
    for length in eval_lengths(task, seq_len):
        for start in range(0, rows, batch):
            examples = [example(task, length, seed, "eval", i) for i in range(start, min(rows, start + batch))]
            predictions = np.asarray(predict(np.stack([ex.stream[:-1] for ex in examples])))
            for ex, pred in zip(examples, predictions):
                right = item_hits(pred, ex, task.item_size)
                group = ex.group if length == seq_len else f"len={length}"
                hits.setdefault(group, []).append(right)
                if length == seq_len and group:
                    hits.setdefault("", []).append(right)
    accuracy = {group: float(np.concatenate(h).mean()) for group, h in hits.items()}
    return {"accuracy": accuracy.pop("")} | {f"accuracy[{group}]": value for group, value in accuracy.items()}
