"""The long-range ablation tasks: deterministic, their answers checkable by rule, scored by exact match."""

import numpy as np
import pytest

from v4jax.ablation import tasks
from v4jax.training import data
from v4jax.training.config import TrainConfig

SEQ = 64


def mqar_oracle(tokens: np.ndarray, task: tasks.Mqar) -> np.ndarray:
    """Predict, after each key, the value that followed that key's first occurrence (what recall should do)."""
    out = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        first = {}
        for t, tok in enumerate(row):
            if 1 <= tok <= task.keys:
                first.setdefault(tok, t)
                if first[tok] < t:
                    out[b, t] = row[first[tok] + 1]
    return out


def passkey_oracle(tokens: np.ndarray, task: tasks.Passkey) -> np.ndarray:
    out = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        key_at = int(np.flatnonzero(row == task.key_marker)[0])
        query_at = int(np.flatnonzero(row == task.query_marker)[0])
        digits = row[key_at + 1:key_at + 1 + task.digits]
        out[b, query_at:query_at + task.digits] = digits
    return out


def induction_oracle(tokens: np.ndarray, task: tasks.Induction) -> np.ndarray:
    out = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
        out[b, -1] = row[int(np.flatnonzero(row == task.symbols)[0]) + 1]
    return out


ORACLES = {tasks.TaskKind.MQAR: mqar_oracle, tasks.TaskKind.PASSKEY: passkey_oracle,
           tasks.TaskKind.INDUCTION: induction_oracle}
TASKS = [tasks.Mqar(pairs=4, stride=4), tasks.Passkey(digits=3), tasks.Induction(symbols=8, test_lengths=(128,))]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.kind.value)
def test_examples_are_deterministic_and_split(task):
    a = tasks.example(task, SEQ, seed=3, split="train", index=7)
    b = tasks.example(task, SEQ, seed=3, split="train", index=7)
    np.testing.assert_array_equal(a.stream, b.stream)
    others = [tasks.example(task, SEQ, seed=4, split="train", index=7),
              tasks.example(task, SEQ, seed=3, split="eval", index=7),
              tasks.example(task, SEQ, seed=3, split="train", index=8)]
    assert all(not np.array_equal(a.stream, o.stream) for o in others)
    assert a.stream.shape == (SEQ + 1,) and a.scored.shape == (SEQ,)
    assert a.stream.min() >= 0 and a.stream.max() < task.vocab_size
    assert a.scored.sum() % task.item_size == 0 and a.scored.sum() > 0


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.kind.value)
def test_rule_based_oracle_scores_one_and_a_constant_scores_near_zero(task):
    oracle = ORACLES[task.kind]
    perfect = tasks.evaluate(task, lambda x: oracle(x, task), SEQ, seed=0, rows=40, batch=16)
    assert all(v == 1.0 for v in perfect.values()), perfect
    blank = tasks.evaluate(task, np.zeros_like, SEQ, seed=0, rows=40, batch=16)
    assert blank["accuracy"] < 0.2


def test_mqar_layout_keeps_every_query_beyond_the_gap():
    task = tasks.Mqar(pairs=4, stride=8, keys=8, values=8)
    assert task.gap(96) == 97 - 32 - 8 == 57
    for i in range(20):
        ex = tasks.example(task, 96, 0, "train", i)
        keys = ex.stream[0:32:8]
        assert len(set(keys.tolist())) == 4 and all(1 <= k <= 8 for k in keys)
        assert np.all(ex.stream[2:8] == 0)  # blanks inside a pair slot
        for t in np.flatnonzero(ex.scored):  # the target after a query key is the value stored with that key
            query, answer = ex.stream[t], ex.stream[t + 1]
            stored = int(np.flatnonzero(keys == query)[0]) * 8
            assert answer == ex.stream[stored + 1] and t - stored > task.gap(96)
    with pytest.raises(ValueError, match="needs seq_len >= 39"):
        tasks.example(task, 30, 0, "train", 0)


def test_bound_mqar_stores_each_pair_as_its_own_token():
    task = tasks.Mqar(pairs=4, keys=4, values=3, stride=1, bound=True)
    assert task.vocab_size == 1 + 4 + 3 + 12
    ids = {task.pair_id(k, v) for k in range(1, 5) for v in range(5, 8)}
    assert ids == set(range(8, 20))
    ex = tasks.example(task, 24, 0, "train", 0)
    for t in np.flatnonzero(ex.scored):
        assert task.pair_id(ex.stream[t], ex.stream[t + 1]) in ex.stream[:4]


def test_passkey_groups_by_depth_and_exact_match_needs_every_digit():
    task = tasks.Passkey(digits=4, depths=(0.0, 1.0))
    groups = {tasks.example(task, SEQ, 0, "eval", i).group for i in range(20)}
    assert groups == {"depth=0", "depth=1"}
    ex = tasks.example(task, SEQ, 0, "eval", 0)
    right = passkey_oracle(ex.stream[None, :-1], task)[0]
    assert tasks.item_hits(right, ex, 4).tolist() == [True]
    one_wrong = right.copy()
    one_wrong[np.flatnonzero(ex.scored)[-1]] += 1
    assert tasks.item_hits(one_wrong, ex, 4).tolist() == [False]
    start = tasks.example(task.__class__(digits=4, depths=(0.0,)), SEQ, 0, "eval", 0)
    assert start.stream[0] == task.key_marker


def test_induction_reports_longer_lengths():
    task = tasks.Induction(symbols=8, test_lengths=(128, 256))
    assert tasks.eval_lengths(task, SEQ) == (SEQ, 128, 256)
    scores = tasks.evaluate(task, lambda x: induction_oracle(x, task), SEQ, seed=0, rows=8)
    assert set(scores) == {"accuracy", "accuracy[len=128]", "accuracy[len=256]"}


def test_parse_and_name_round_trip():
    for spec in ("mqar", "mqar:pairs=8,stride=4", "mqar:stride=1,bound=1", "passkey:digits=3,depths=0/0.5", "induction:test_lengths=256/512"):
        assert tasks.name(tasks.parse(spec)) == spec
    assert tasks.parse("induction:test_lengths=256").test_lengths == (256,)
    for bad, message in (("sorting", "unknown task"), ("mqar:size=3", "key=value"), ("mqar:pairs=x", "bad value"),
                         ("mqar:pairs=20", "keys >= pairs")):
        with pytest.raises(ValueError, match=message):
            tasks.parse(bad)


def test_tasks_come_through_the_training_data_pipeline():
    cfg = TrainConfig(data="synthetic:mqar:pairs=4,stride=4", seq_len=SEQ, batch_size=4, seed=5)
    batch = data.make_dataset(cfg, vocab_size=64).batch(0)
    ex = tasks.example(tasks.Mqar(pairs=4, stride=4), SEQ, 5, "train", 0)
    np.testing.assert_array_equal(batch["tokens"][0], ex.stream[:-1])
    np.testing.assert_array_equal(batch["loss_mask"][0], ex.scored)
    assert batch["loss_mask"].sum() == 4 * 4
    with pytest.raises(ValueError, match="vocab_size"):
        data.make_dataset(cfg, vocab_size=16)
    with pytest.raises(ValueError, match="needs seq_len"):
        data.make_dataset(TrainConfig(data="synthetic:mqar:pairs=8,stride=8", seq_len=32), vocab_size=64)
