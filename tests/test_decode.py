"""Serving cache and steps: prefill + step-by-step decode == the full forward at every position, per layer kind;
rows at different positions; sharded == single device; the cache's bytes == the cost model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import cost, model
from v4jax.config import preset
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode
from v4jax.sharding import make_mesh

T = 40  # crosses tiny windows (8) and both tiny-v4 ratios (4, 16) at least twice
PROMPTS = np.array([13, 6])  # rows start decoding at different positions
CONFIGS = {
    "M": {"name": "tiny-v3"},  # MLA, scanned unit
    "M+S": {"name": "tiny-hybrid", "window": 8},
    "W+C+H": {"name": "tiny-v4"},  # hash + top-k routing, mHC, indexer top-k
}


def scaled_params(cfg, factor=2.0):
    """Random parameters with matrices scaled up, so attention is far from uniform and masks matter."""
    params = model.init(cfg, jax.random.key(0))
    return jax.tree.map(lambda a: a * factor if a.ndim >= 2 and a.dtype == jnp.float32 else a, params)


@functools.cache
def setup(label):
    fields = dict(CONFIGS[label])
    cfg = preset(fields.pop("name"), **fields)
    params = scaled_params(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (len(PROMPTS), T), 0, cfg.vocab_size))
    return cfg, params, tokens, np.asarray(model.forward(cfg, params, tokens))


def prefill_then_decode(cfg, params, tokens, max_len=48, chunk=5, mesh=None):
    """Logits at every position of `tokens` from a chunked prefill of PROMPTS[b] tokens, then one-token steps."""
    b = tokens.shape[0]
    cache = cache_lib.init_cache(cfg, b, max_len, mesh=mesh)
    out = np.zeros((b, T, cfg.vocab_size), np.float32)
    last, cache = decode.prefill(cfg, params, cache, tokens[:, :PROMPTS.max()], PROMPTS, chunk=chunk)
    pos = PROMPTS.copy()
    out[np.arange(b), pos - 1] = np.asarray(last)
    # Recover every prompt position too: a second cache prefilled one chunk at a time through `extend`.
    check = cache_lib.init_cache(cfg, b, max_len, mesh=mesh)
    for start in range(0, PROMPTS.max(), chunk):
        counts = np.clip(PROMPTS - start, 0, chunk)
        piece = np.zeros((b, chunk), np.int32)
        width = min(chunk, T - start)
        piece[:, :width] = tokens[:, start:start + width]
        logits, check = decode.extend(cfg, params, check, piece, counts)
        for r in range(b):
            out[r, start:start + counts[r]] = np.asarray(logits[r, :counts[r]])
    while (pos < T).any():
        active = pos < T
        logits, cache = decode.decode_step(cfg, params, cache, tokens[np.arange(b), np.minimum(pos, T - 1)], active)
        logits = np.asarray(logits)
        for r in np.flatnonzero(active):
            out[r, pos[r]] = logits[r]
        pos = pos + active
    assert np.asarray(cache.lengths).tolist() == [T] * b
    return out


@pytest.mark.parametrize("label", list(CONFIGS))
def test_prefill_and_decode_equal_the_forward(label):
    cfg, params, tokens, full = setup(label)
    ours = prefill_then_decode(cfg, params, tokens)
    scale = np.abs(full).max()
    err = np.abs(ours - full).max(axis=-1) / scale  # [b, t]
    assert err.max() < 1e-4, (label, np.round(err, 6))


def test_sharded_serving_equals_single_device():
    cfg, params, tokens, _ = setup("W+C+H")
    single = prefill_then_decode(cfg, params, tokens)
    mesh = make_mesh(data=2, expert=2, tensor=2)
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, model_shardings(cfg, mesh))
        sharded = prefill_then_decode(cfg, sharded_params, tokens, mesh=mesh)
    np.testing.assert_allclose(sharded, single, atol=1e-4 * np.abs(single).max())


def model_shardings(cfg, mesh):
    from v4jax.sharding import state_shardings

    return state_shardings(model.abstract(cfg), mesh, "serve")


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-hybrid", "tiny-v4", "deepseek-v4-flash", "deepseek-v4-pro",
                                  "deepseek-v3-671b"])
@pytest.mark.parametrize("max_len", [7, 48, 4096])
def test_cache_bytes_equal_the_cost_model(name, max_len):
    cfg = preset(name)
    spec = cache_lib.cache_spec(cfg, batch=3, max_len=max_len)  # eval_shape-style: nothing allocated
    fmt = cost.plain_format(jnp.dtype(cfg.dtype))
    assert cache_lib.cache_bytes(spec) == cost.kv_cache_bytes(cfg, max_len, fmt, batch=3, include_state=True)


def test_prefill_refuses_what_does_not_fit():
    cfg, params, tokens, _ = setup("M")
    cache = cache_lib.init_cache(cfg, 2, 16)
    with pytest.raises(ValueError, match="row 0: 20 prompt tokens do not fit the cache"):
        decode.prefill(cfg, params, cache, tokens[:, :20], np.array([20, 3]))


def test_insert_replaces_one_row():
    cfg = preset("tiny-v4")
    params = scaled_params(cfg)
    tokens = np.arange(1, 11, dtype=np.int32)[None]
    one = cache_lib.init_cache(cfg, 1, 24)
    _, one = decode.prefill(cfg, params, one, tokens, np.array([10]), chunk=8)
    batch = cache_lib.insert(cache_lib.init_cache(cfg, 3, 24), 1, one)
    assert np.asarray(batch.lengths).tolist() == [0, 10, 0]
    for full, row in zip(jax.tree.leaves(batch.prefix), jax.tree.leaves(one.prefix)):
        np.testing.assert_array_equal(np.asarray(full[1]), np.asarray(row[0]))
        assert not np.asarray(full[0]).any() and not np.asarray(full[2]).any()
    for full, row in zip(jax.tree.leaves(batch.unit), jax.tree.leaves(one.unit)):
        np.testing.assert_array_equal(np.asarray(full[:, 1]), np.asarray(row[:, 0]))


def test_one_row_cache_on_a_data_sharded_mesh_is_replicated():
    """A request's batch-1 prefill cache cannot split over `data`; it is replicated and still prefills."""
    cfg, params, tokens, full = setup("M")
    mesh = make_mesh(data=2, expert=2, tensor=2)
    with jax.set_mesh(mesh):
        one = cache_lib.init_cache(cfg, 1, 24, mesh=mesh)
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(one))
        batch = cache_lib.init_cache(cfg, 2, 24, mesh=mesh)
        assert not batch.lengths.sharding.is_fully_replicated
        last, one = decode.prefill(cfg, params, one, tokens[:1, :9], np.array([9]), chunk=4)
    np.testing.assert_allclose(np.asarray(last[0]), full[0, 8], atol=1e-4 * np.abs(full).max())


def test_an_idle_slot_is_finite_and_changes_nothing():
    """An inactive row that never held a token sees no key at all: zeros, not NaN, and no effect on its neighbours
    (a NaN would spread through the MoE dispatch)."""
    cfg, params, tokens, full = setup("M")
    cache = cache_lib.init_cache(cfg, 2, 16)
    logits, cache = decode.decode_step(cfg, params, cache, tokens[:, 0], np.array([True, False]))
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(np.asarray(logits[0]), full[0, 0], atol=1e-4 * np.abs(full).max())
    assert np.asarray(cache.lengths).tolist() == [1, 0]
