"""V4 kernels: `v4_blockwise` (banded window + chunked top-k / chunked compressed entries, online softmax)
against `v4_reference` (dense masks over every raw and compressed entry), in values and gradients, for W, H and C.

Shapes: q [b, t, n, c], kv [b, t, c]; compressed entries [b, w, c]; indexer queries [b, t, h, i], keys [b, w, i].
t = 45 with window 6, block 8, ratio 4 (C, 11 entries) or 8 (H, 5 entries): queries in the first blocks see fewer
than top-k entries, the last block is partial, and row 0 packs two documents (so entries spanning the boundary
must stay invisible). With the default chunks (max(block, top-k) entries for C, a block for H, capped at the
entries) C scores 2 chunks, the first blocks skipping the second. The `chunk` / `span` cases cut the entries
finer (C: 6 chunks of 2 in 3 spans of 4, so later blocks merge the running top-k twice; H: 3 chunks), so blocks
skip and merge at different points; `gather` gathers the top-k entries of 2 queries at a time (4 steps per
block) instead of the whole block's. The ties case makes half the index scores exactly 0 (+0.0 or -0.0).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.attention import kernels

B, T, N, C, HI, I = 2, 45, 3, 8, 4, 6
WINDOW, BLOCK, SCALE = 6, 8, C ** -0.5


def inputs(ratio: int, topk: int | None, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[0, 19:] = 1  # a boundary inside a compressed block for both ratios
    segment_ids = jnp.asarray(segment_ids)
    q, kv, sinks = normal(B, T, N, C), normal(B, T, C), normal(N)
    if not ratio:
        return q, kv, segment_ids, sinks, None
    w = T // ratio
    blocks = np.asarray(segment_ids)[:, :w * ratio].reshape(B, w, ratio)
    entry_segment = np.where((blocks == blocks[..., -1:]).all(-1), blocks[..., -1], kernels.INVALID_SEGMENT)
    selection = None
    if topk:
        keys = normal(B, w, I)
        if ties:  # every other entry scores exactly 0 (+0.0 or -0.0 by the weights' signs) for every query
            keys = keys.at[:, ::2].set(0.0)
        selection = kernels.Selection(queries=normal(B, T, HI, I), weights=normal(B, T, HI), keys=keys,
                                      topk=topk, scale=I ** -0.5)
    compressed = kernels.Compressed(normal(B, w, C), jnp.asarray(entry_segment, jnp.int32), ratio, selection)
    return q, kv, segment_ids, sinks, compressed


def value_and_grads(kernel, q, kv, segment_ids, sinks, compressed):
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, kv, sinks, entries):
        comp = None if compressed is None else compressed.replace(entries=entries)
        out = kernel(q, kv, segment_ids, sinks, SCALE, WINDOW, BLOCK, comp)
        return jnp.sum(out * weights), out

    entries = None if compressed is None else compressed.entries
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, kv, sinks, entries)
    return out, grads


# name: (ratio, top-k, v4_blockwise's chunk / span knobs, index keys with exact ties)
CASES = {
    "W": (0, None, {}, False),
    "H": (8, None, {}, False),
    "H-chunks-of-2": (8, None, {"chunk": 2}, False),
    "C": (4, 3, {}, False),
    "C-topk-beyond-visible": (4, 50, {}, False),
    "C-merged-spans": (4, 3, {"chunk": 2, "span": 4, "gather": 2}, False),
    "C-ties-merged-spans": (4, 3, {"chunk": 2, "span": 4}, True),
}


@functools.cache
def results():
    @jax.jit
    def run(all_inputs):
        out = {}
        for name, args in all_inputs.items():
            blockwise = functools.partial(kernels.v4_blockwise, **CASES[name][2])
            out[name] = (value_and_grads(blockwise, *args), value_and_grads(kernels.v4_reference, *args))
        return out

    return jax.device_get(run({name: inputs(ratio, topk, ties=ties) for name, (ratio, topk, _, ties) in CASES.items()}))


@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_dense_reference(case):
    (out, grads), (ref_out, ref_grads) = results()[case]
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g, rg in zip(("q", "kv", "sinks", "entries"), grads, ref_grads):
        if rg is None:
            continue
        assert np.abs(rg).max() > 1e-3, f"d/d{name} vanished"
        np.testing.assert_allclose(g, rg, atol=1e-5, rtol=1e-5, err_msg=f"d/d{name}")


def test_compressed_entries_and_selection_change_the_output():
    """So the equalities above could fail: dropping the compressed branch or the top-k changes the result."""
    q, kv, seg, sinks, comp = inputs(4, 3)
    with_entries = kernels.v4_reference(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, comp)
    window_only = kernels.v4_reference(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, None)
    all_visible = kernels.v4_reference(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, comp.replace(selection=None))
    assert np.abs(with_entries - window_only).max() > 1e-2
    assert np.abs(with_entries - all_visible).max() > 1e-2
    np.testing.assert_allclose(with_entries[:, :3], window_only[:, :3], atol=1e-6)  # no entry complete yet


def test_entries_spanning_two_documents_are_invisible():
    q, kv, seg, sinks, comp = inputs(8, None)
    # Row 0's block 2 (tokens 16-23) straddles the boundary at 19: marked invalid, so changing it changes nothing.
    assert comp.entry_segment[0, 2] == kernels.INVALID_SEGMENT
    poked = comp.replace(entries=comp.entries.at[0, 2].add(100.0))
    a = kernels.v4_blockwise(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, comp)
    b = kernels.v4_blockwise(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, poked)
    np.testing.assert_array_equal(a[0], b[0])


def test_no_gradient_reaches_the_indexer():
    q, kv, seg, sinks, comp = inputs(4, 3)

    def loss(selection):
        return kernels.v4_blockwise(q, kv, seg, sinks, SCALE, WINDOW, BLOCK, comp.replace(selection=selection)).sum()

    grads = jax.grad(loss)(comp.selection)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
