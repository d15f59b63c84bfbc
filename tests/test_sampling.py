"""Sampling on values: greedy is argmax, top-k stays in the k best, top-p keeps the smallest nucleus, seeds
reproduce, temperature -> 0 is greedy, bad settings are refused."""

import jax
import numpy as np
import pytest

from v4jax.serving import sampling
from v4jax.serving.sampling import SamplingParams

DRAWS = 4096


def draw(logits, *, temperature=1.0, top_k=0, top_p=1.0, seeds=None, steps=None):
    """`DRAWS` samples of one row of logits (one row per draw, the draw index as the step)."""
    logits = np.broadcast_to(np.asarray(logits, np.float32), (DRAWS, len(logits)))
    seeds = np.zeros(DRAWS, np.uint32) if seeds is None else seeds
    steps = np.arange(DRAWS, dtype=np.int32) if steps is None else steps
    full = lambda value, dtype: np.full(DRAWS, value, dtype)
    return np.asarray(sampling.sample_jit(logits, seeds, steps, full(temperature, np.float32),
                                          full(top_k, np.int32), full(top_p, np.float32)))


def test_greedy_is_argmax_whatever_the_filters():
    logits = jax.random.normal(jax.random.key(0), (6, 97)) * 3
    batch = sampling.BatchParams.of([SamplingParams(temperature=0.0, top_k=k, top_p=p, seed=s)
                                     for k, p, s in [(0, 1.0, 0), (5, 1.0, 1), (0, 0.3, 2), (2, 0.5, 3),
                                                     (1, 1.0, 4), (0, 1.0, 5)]])
    out = sampling.sample_jit(logits, *batch.arrays())
    np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))


def test_greedy_matches_argmax_on_ties_infinities_and_nans():
    rows = np.array([[0.0, 3.0, 3.0, 1.0, 3.0],          # ties: the first
                     [-np.inf] * 5,                         # all -inf: index 0
                     [1.0, np.nan, 5.0, np.nan, 2.0],       # a NaN wins, the first one
                     [np.inf, 1.0, np.inf, 0.0, -1.0],
                     [-2.0, -1.0, -3.0, -1.5, -7.0]], np.float32)
    for logits in (rows, np.asarray(jax.random.normal(jax.random.key(1), (3, 129_280))), rows[2]):
        np.testing.assert_array_equal(sampling.greedy_jit(logits), np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(sampling.greedy_jit(rows), [1, 0, 1, 0, 1])


def test_a_mixed_batch_samples_its_rows_as_an_all_sampled_one():
    """Greedy rows in a batch with sampled ones (the full path, not the greedy-only shortcut) still take the argmax,
    and the sampled rows draw what they draw in a batch without greedy rows."""
    logits = jax.random.normal(jax.random.key(2), (4, 50)) * 2
    sampled = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    mixed = [SamplingParams(temperature=0.0), sampled[1], SamplingParams(temperature=0.0), sampled[3]]
    steps = [7, 7, 7, 7]
    all_sampled = np.asarray(sampling.sample_jit(logits, *sampling.BatchParams.of(sampled, steps).arrays()))
    out = np.asarray(sampling.sample_jit(logits, *sampling.BatchParams.of(mixed, steps).arrays()))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(out[[0, 2]], argmax[[0, 2]])
    np.testing.assert_array_equal(out[[1, 3]], all_sampled[[1, 3]])


def test_top_k_rows_draw_the_top_k_distribution_whatever_their_batch_mates():
    """Rows with 0 < top_k <= TOP_K_SHORT_LIST draw from a `lax.top_k` short list, rows without filters from the
    unsorted logits, the others through thresholds (`threshold_filter`): on a vocabulary longer than the list,
    top-k rows keep the top-k distribution, and each row's tokens are the same whatever way its batch-mates take."""
    vocab = 3 * sampling.TOP_K_SHORT_LIST
    logits = np.asarray(jax.random.normal(jax.random.key(4), (vocab,)), np.float32) * 3
    top5 = np.argsort(-logits)[:5]
    out = draw(logits, temperature=1.0, top_k=5)
    assert set(out.tolist()) <= set(top5.tolist())
    expected = np.exp(logits[top5] - logits[top5].max())
    np.testing.assert_allclose([np.mean(out == t) for t in top5], expected / expected.sum(), atol=0.03)

    batch = np.broadcast_to(logits, (4, vocab))
    short = [SamplingParams(temperature=1.0, top_k=5, seed=s) for s in range(4)]
    mixed = short[:2] + [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=8)]
    for step in range(5):
        steps = [step] * 4
        alone = np.asarray(sampling.sample_jit(batch, *sampling.BatchParams.of(short, steps).arrays()))
        beside = np.asarray(sampling.sample_jit(batch, *sampling.BatchParams.of(mixed, steps).arrays()))
        plain = np.asarray(sampling.sample_jit(batch, *sampling.BatchParams.of([mixed[2]] * 4, steps).arrays()))
        np.testing.assert_array_equal(alone[:2], beside[:2])
        assert beside[2] == plain[0]


def test_rows_past_one_block_sample_as_they_would_alone():
    """A batch of more than `SAMPLE_BLOCK` rows is sampled a block at a time, its last block overlapping the one
    before: every row, whatever its way and its block, draws the token it draws as a batch of one."""
    rows = 2 * sampling.SAMPLE_BLOCK + 3
    logits = np.asarray(jax.random.normal(jax.random.key(6), (rows, 300)), np.float32) * 2
    settings = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                dict(temperature=1.0, top_p=0.7), dict(temperature=1.3, top_k=2_000, top_p=0.9)]
    params = [SamplingParams(seed=row, **settings[row % len(settings)]) for row in range(rows)]
    steps = list(range(rows))
    together = np.asarray(sampling.sample_jit(logits, *sampling.BatchParams.of(params, steps).arrays()))
    alone = [int(sampling.sample_jit(logits[row:row + 1], *sampling.BatchParams.of([params[row]], [row]).arrays())[0])
             for row in range(rows)]
    np.testing.assert_array_equal(together, alone)
    assert len(set(together.tolist())) > rows // 2  # really drawn, not one token for all


def test_temperature_to_zero_is_greedy():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (64,)) * 2)
    for temperature in (1e-4, 1e-7, 1e-30):
        assert set(draw(logits, temperature=temperature)) == {int(np.argmax(logits))}, temperature


def test_top_k_never_samples_outside_the_k_best():
    logits = np.asarray(jax.random.normal(jax.random.key(2), (50,)), np.float32)
    best = set(np.argsort(-logits)[:3].tolist())
    out = draw(logits, temperature=5.0, top_k=3)  # a hot temperature: without top-k the tail would show
    assert set(out.tolist()) == best
    assert len(set(draw(logits, temperature=5.0).tolist())) > 10


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = np.log(probs)
    for top_p, nucleus in [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
        scaled = sampling.threshold_filter(logits[None], np.ones(1, np.float32), np.zeros(1, np.int32),
                                           np.full(1, top_p, np.float32))
        kept = set(np.flatnonzero(np.isfinite(np.asarray(scaled)[0])).tolist())
        assert kept == nucleus, (top_p, kept)
        assert set(draw(logits, top_p=top_p).tolist()) == nucleus, top_p
    # inside the nucleus the renormalised probabilities: 0.5 / 0.8 and 0.3 / 0.8
    share = np.mean(draw(logits, top_p=0.75) == 1)
    assert abs(share - 0.625) < 0.04, share


def sorted_filter(logits, temperature, top_k, top_p):
    """The filters' definition on one row, in float64: a stable sort, most likely first, ties by id; top-k keeps
    the first k, top-p the renormalised survivors before the first whose strictly-more-likely mass reaches p."""
    order = np.argsort(-logits, kind="stable")
    scaled = logits[order].astype(np.float64) / max(temperature, sampling.MIN_TEMPERATURE)
    keep = np.isfinite(scaled) | (np.arange(len(scaled)) == 0)
    if 0 < top_k < len(scaled):
        keep[top_k:] = False
    if top_p < 1:
        probs = np.where(keep, np.exp(scaled - scaled[0]), 0.0)
        probs /= probs.sum()
        keep &= (np.cumsum(probs) - probs < top_p) | (np.arange(len(scaled)) == 0)
    kept = np.zeros(len(scaled), bool)
    kept[order] = keep
    return kept


@pytest.mark.parametrize("kind", ["spread", "ties", "minus_inf"])
def test_threshold_filter_keeps_what_a_sort_keeps(kind):
    """The bisection filters against the sort-based definition, on rows with many equal logits (ties at the
    threshold are kept in id order) and with -inf entries, for top-k beyond the short-list limit too."""
    rng = np.random.default_rng(["spread", "ties", "minus_inf"].index(kind))
    checked = 0
    for vocab in (7, 300, 5_000):
        logits = rng.standard_normal((12, vocab)).astype(np.float32) * rng.choice([0.5, 3.0, 10.0], (12, 1))
        if kind == "ties":
            logits = np.round(logits)
        if kind == "minus_inf":
            logits[:, ::3] = -np.inf
        temperature = rng.choice([0.5, 1.0, 2.0], 12).astype(np.float32)
        top_k = rng.choice([0, 1, 3, vocab // 2, vocab, vocab + 5], 12).astype(np.int32)
        top_p = rng.choice([1.0, 0.3, 0.5, 0.9, 0.99, 1e-3], 12).astype(np.float32)
        scaled = np.asarray(jax.jit(sampling.threshold_filter)(logits, temperature, top_k, top_p))
        for row in range(12):
            want = sorted_filter(logits[row], temperature[row], top_k[row], top_p[row]) & np.isfinite(logits[row])
            np.testing.assert_array_equal(np.isfinite(scaled[row]), want, err_msg=f"row {row} of {vocab}")
            np.testing.assert_allclose(scaled[row][want], logits[row][want] / temperature[row], rtol=1e-6)
            checked += want.sum() < want.size  # rows where something was filtered
    assert checked > 12


def test_draw_follows_the_weights_and_never_takes_minus_inf():
    logits = np.array([np.log(0.1), -np.inf, np.log(0.6), -np.inf, np.log(0.3)], np.float32)
    keys = jax.random.split(jax.random.key(5), DRAWS)
    out = np.asarray(jax.jit(sampling.draw)(keys, np.broadcast_to(logits, (DRAWS, 5))))
    counts = np.bincount(out, minlength=5) / DRAWS
    assert counts[1] == counts[3] == 0
    np.testing.assert_allclose(counts, [0.1, 0.0, 0.6, 0.0, 0.3], atol=0.03)


def test_top_k_then_top_p():
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    # top-k 2 leaves 0.4 / 0.7 and 0.3 / 0.7; top-p 0.5 then keeps only the first
    assert set(draw(np.log(probs), top_k=2, top_p=0.5).tolist()) == {0}
    assert set(draw(np.log(probs), top_k=2, top_p=0.6).tolist()) == {0, 1}


def test_temperature_one_follows_the_softmax():
    probs = np.array([0.6, 0.25, 0.1, 0.05], np.float32)
    counts = np.bincount(draw(np.log(probs)), minlength=4) / DRAWS
    np.testing.assert_allclose(counts, probs, atol=0.03)


def test_same_seed_same_tokens_different_seeds_differ():
    logits = np.asarray(jax.random.normal(jax.random.key(3), (200,)), np.float32)
    steps = np.tile(np.arange(DRAWS // 4, dtype=np.int32), 4)
    seeds = np.repeat(np.array([7, 7, 8, 7 + (1 << 32)], np.uint64) % (1 << 32), DRAWS // 4).astype(np.uint32)
    a, b, c, d = draw(logits, seeds=seeds, steps=steps).reshape(4, -1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)  # seeds are taken modulo 2**32
    assert np.mean(a != c) > 0.5
    # a seed's stream depends on the step index only, not on the row or the other rows
    again = np.asarray(sampling.sample_jit(np.stack([logits, logits * 0]), np.array([7, 0], np.uint32),
                                           steps[[5, 0]], np.ones(2, np.float32), np.zeros(2, np.int32),
                                           np.ones(2, np.float32)))
    assert again[0] == a[5]


def test_batch_params_rows():
    batch = sampling.BatchParams.of([SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=-1)], steps=[3])
    assert batch.seeds[0] == (1 << 32) - 1 and batch.steps[0] == 3 and batch.top_k[0] == 5
    np.testing.assert_allclose([batch.temperature[0], batch.top_p[0]], [0.7, 0.9])


@pytest.mark.parametrize("fields, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": "1"}, "seed"),
    ({"stop_tokens": (-3,)}, "stop token"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_stop_tokens_checked_against_the_vocab():
    with pytest.raises(ValueError, match="stop token"):
        SamplingParams(stop_tokens=(600,)).validate(vocab_size=512)
