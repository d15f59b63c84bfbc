"""Attention kernels: blockwise (flash-style) and banded (sliding window) against the dense masked reference.

Shapes: q [b, t, n, h], k [b, s, n, h], v [b, s, n, hv], segment_ids int [b, t]. Values and gradients wrt q, k, v.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.attention import kernels, mask

B, N, H, HV = 2, 2, 8, 6
SCALE = H ** -0.5


def inputs(t: int, seed: int = 0):
    """Random q, k, v, segment ids and output weights. Row 0 packs three documents; row 1 is one causal sequence.

    numpy draws: every eager jax.random call on a new shape would cost a compile.
    """
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, t, N, H), np.float32) for _ in range(2))
    v, weights = (rng.standard_normal((B, t, N, HV), np.float32) for _ in range(2))
    segment_ids = np.zeros((B, t), np.int32)
    segment_ids[0, t // 3:] = 1
    segment_ids[0, t // 3 + t // 4:] = 2
    return tuple(jnp.asarray(a) for a in (q, k, v, segment_ids, weights))


def value_and_grads(kernel, q, k, v, segment_ids, weights):
    """The kernel's output and d(sum(out * weights)) / d(q, k, v)."""
    def loss(q, k, v):
        out = kernel(q, k, v, segment_ids)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def run_cases(cases):
    """{case: (fast, reference)}, every case traced into one jit: one compile instead of one per case."""
    @jax.jit
    def run(all_args):
        return {case: (value_and_grads(fast, *all_args[case]), value_and_grads(ref, *all_args[case]))
                for case, (fast, ref, _) in cases.items()}

    return jax.device_get(run({case: args for case, (_, _, args) in cases.items()}))


def assert_same(fast, ref, atol=1e-5):
    out, grads = fast
    ref_out, ref_grads = ref
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=1e-5)
    assert np.abs(ref_grads[2]).max() > 1e-2  # d/dv is never zero (d/dq, d/dk are with a window of 1)
    for name, g, rg in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, rg, atol=atol, rtol=1e-5, err_msg=f"d/d{name}")


# (t, block): a multiple of the block, not a multiple, block larger than the sequence.
BLOCKWISE = [(32, 8), (21, 8), (13, 64)]
# t=21, block 8: windows 1 and 3 below the block, 13 above it, 21 (= t) and 40 reach the whole sequence;
# then a block (64) larger than the sequence (11).
BANDED = [(21, 8, w) for w in (1, 3, 13, 21, 40)] + [(11, 64, 4)]


@pytest.fixture(scope="module")
def blockwise_results():
    return run_cases({
        (t, block): (lambda q, k, v, seg, block=block: kernels.blockwise(q, k, v, seg, SCALE, block),
                     lambda q, k, v, seg: kernels.reference(q, k, v, seg, SCALE),
                     inputs(t, seed=t))
        for t, block in BLOCKWISE})


@pytest.fixture(scope="module")
def banded_results():
    return run_cases({
        (t, block, w): (lambda q, k, v, seg, block=block, w=w: kernels.banded(q, k, v, seg, SCALE, w, block),
                        lambda q, k, v, seg, w=w: kernels.reference(q, k, v, seg, SCALE, window=w),
                        inputs(t, seed=w))
        for t, block, w in BANDED})


@pytest.mark.parametrize("t, block", BLOCKWISE)
def test_blockwise_equals_reference(blockwise_results, t, block):
    fast, ref = blockwise_results[(t, block)]
    assert fast[0].shape == (B, t, N, HV)
    assert_same(fast, ref)


@pytest.mark.parametrize("t, block, window", BANDED)
def test_banded_equals_reference(banded_results, t, block, window):
    fast, ref = banded_results[(t, block, window)]
    assert fast[0].shape == (B, t, N, HV)
    assert_same(fast, ref)


reference = jax.jit(kernels.reference, static_argnames=("scale", "window"))


def test_reference_against_numpy():
    """The reference itself: an explicit per-query softmax over the visible keys, in float64."""
    q, k, v, segment_ids, _ = inputs(9, seed=5)
    window = 4
    out = np.asarray(reference(q, k, v, segment_ids, SCALE, window))
    q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, segment_ids))
    expected = np.zeros_like(out, dtype=np.float64)
    for b in range(B):
        for i in range(q.shape[1]):
            keys = [j for j in range(i + 1) if seg[b, j] == seg[b, i] and i - j < window]
            for n in range(N):
                scores = np.array([q[b, i, n] @ k[b, j, n] for j in keys]) * SCALE
                p = np.exp(scores - scores.max())
                p /= p.sum()
                expected[b, i, n] = sum(pj * v[b, j, n] for pj, j in zip(p, keys))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_window_and_segments_change_the_result():
    """Sanity for the comparisons above: the masks really bite."""
    q, k, v, segment_ids, _ = inputs(9, seed=5)
    full = reference(q, k, v, jnp.zeros_like(segment_ids), SCALE)
    packed = reference(q, k, v, segment_ids, SCALE)
    windowed = reference(q, k, v, jnp.zeros_like(segment_ids), SCALE, window=3)
    assert not np.allclose(full, packed, atol=1e-3)
    assert not np.allclose(full, windowed, atol=1e-3)
    # The first query of each document sees only itself: output = its own value.
    first = np.asarray(segment_ids[0, 1:] != segment_ids[0, :-1]).nonzero()[0] + 1
    np.testing.assert_allclose(packed[0, first], v[0, first], atol=1e-6)


def test_mask_visible():
    seg = jnp.array([[0, 0, 1, 1, 1]])
    index = jnp.arange(5)
    got = np.asarray(mask.visible(index, index, seg, seg, window=2))[0].astype(int)
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(mask.visible(index, index, seg, seg))[0].astype(int),
                                  np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                            [0, 0, 1, 1, 1]]))


def test_banded_equals_reference_with_negative_segment_ids():
    """The band's left pad stays invisible even to queries whose segment id is -1 (left padding)."""
    q, k, v, _, _ = inputs(12, seed=11)
    segment_ids = jnp.asarray([[-1] * 3 + [0] * 9, [0] * 12], jnp.int32)  # row 0 left-padded with id -1
    got = jax.jit(kernels.banded, static_argnums=(4, 5, 6))(q, k, v, segment_ids, SCALE, 4, 8)
    np.testing.assert_allclose(got, reference(q, k, v, segment_ids, SCALE, 4), atol=1e-5)
