"""Serving over a context-split cache (`attention.cached.extend` on a mesh whose `context` axis splits the cache's
positions): chunked prefill and decode steps give one device's logits, the split arrays stay split, and the
compiled step moves exactly the bytes `cost.decode_context_bytes` predicts (no cache array is gathered)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from v4jax import cost, hlo, model
from v4jax.attention import cached
from v4jax.config import AttentionKind, preset
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode
from v4jax.sharding import make_mesh, state_shardings

T = 40  # tokens per row: crosses the tiny windows (8) and both tiny-v4 ratios (4, 16) at least twice
PROMPTS = np.array([13, 6])  # rows start decoding at different positions
CHUNK = 5
MAX_LEN = 64  # latents 64 and C entries 16 split over 2 or 4 shards; H's 4 entries over 2 or 4
CONFIGS = {
    "M": ("tiny-v3", {}),  # scanned unit
    "M+S": ("tiny-hybrid", {"window": 8}),
    "W+C+H": ("tiny-v4", {}),  # C's top-k (3) is below its entries per shard (4 at context 4)
}


@functools.cache
def setup(label):
    name, fields = CONFIGS[label]
    cfg = preset(name, **fields)
    params = model.init(cfg, jax.random.key(0))
    # matrices scaled up so attention is far from uniform and every mask matters
    params = jax.tree.map(lambda a: a * 2.0 if a.ndim >= 2 and a.dtype == jnp.float32 else a, params)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (len(PROMPTS), T), 0, cfg.vocab_size))
    return cfg, params, tokens


def serve(cfg, params, tokens, mesh=None):
    """Logits at every position: the prompts in chunks through `decode.extend` (the chunked-prefill path), then
    one-token `decode_step`s. Returns (logits [b, T, vocab], the final cache)."""
    b = tokens.shape[0]
    cache = cache_lib.init_cache(cfg, b, MAX_LEN, mesh=mesh)
    out = np.zeros((b, T, cfg.vocab_size), np.float32)
    for start in range(0, PROMPTS.max(), CHUNK):
        counts = np.clip(PROMPTS - start, 0, CHUNK)
        logits, cache = decode.extend(cfg, params, cache, tokens[:, start:start + CHUNK], counts)
        for r in range(b):
            out[r, start:start + counts[r]] = np.asarray(logits[r, :counts[r]])
    pos = PROMPTS.copy()
    while (pos < T).any():
        active = pos < T
        logits, cache = decode.decode_step(cfg, params, cache, tokens[np.arange(b), np.minimum(pos, T - 1)], active)
        logits = np.asarray(logits)
        for r in np.flatnonzero(active):
            out[r, pos[r]] = logits[r]
        pos = pos + active
    assert np.asarray(cache.lengths).tolist() == [T] * b
    return out, cache


@functools.cache
def one_device(label):
    cfg, params, tokens = setup(label)
    return serve(cfg, params, tokens)[0]


def split_leaves(cache, c):
    """(name, sharding spec, position dim) of every cache array `cached.is_split` says is split over c shards."""
    found = []
    for layers, stacked in ((cache.prefix, 0), (cache.unit, 1), (cache.suffix, 0)):
        for layer in layers:
            for name, leaf in layer.items():
                if cached.is_split(name, leaf.shape[stacked:], c):
                    found.append((name, leaf.sharding.spec, 1 + stacked))
    return found


@pytest.mark.parametrize("label,axes", [("M", {"context": 4}), ("M+S", {"context": 4}), ("W+C+H", {"context": 4}),
                                        ("W+C+H", {"data": 2, "context": 4}), ("M", {"context": 2})],
                         ids=["M-c4", "M+S-c4", "W+C+H-c4", "W+C+H-d2xc4", "M-c2"])
def test_split_cache_serving_equals_one_device(label, axes):
    cfg, params, tokens = setup(label)
    mesh = make_mesh(**axes)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, state_shardings(model.abstract(cfg), mesh, "serve"))
        got, cache = serve(cfg, placed, tokens, mesh)
    leaves = split_leaves(cache, axes["context"])
    kinds = {s.attention for s in cfg.layers}
    want_names = {"latents"} if AttentionKind.FULL in kinds else set()
    if AttentionKind.CSA in kinds:
        want_names |= {"entries", "index_keys"}
    assert {name for name, _, _ in leaves} == want_names
    for name, spec, dim in leaves:  # still split along positions after every donated step
        assert spec[dim] == "context", (name, spec)
    want = one_device(label)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{label} {axes}: max error {err:.2e} of the largest logit")
    assert err < 1e-5, (label, axes, err)


def test_split_top_k_breaks_ties_like_one_device():
    """C's global top-k from per-shard candidates picks the same indices as `lax.top_k` over all entries, ties
    (many equal scores, and the -inf of entries not visible yet) resolved to the lower index."""
    c, w, k = 4, 16, 3
    scores = jax.random.randint(jax.random.key(0), (2, 5, w), 0, 3).astype(jnp.float32)
    scores = jnp.where(jnp.arange(w) < jnp.array([[10], [2]])[:, :, None], scores, -jnp.inf)  # [b, t, w]
    mesh = make_mesh(context=c)

    def local(scores):
        shard = cached.Shard(("context",), c, jax.lax.axis_index("context"))
        return cached._top_k(scores, k, shard.offset(scores.shape[-1]), shard)

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(None, None, "context"), out_specs=P(),
                                  check_vma=False))(scores)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(scores, k)[1]))
    assert np.asarray(got)[1].max() >= 2  # fewer than k visible: the rest come from the -inf ties, in order


@pytest.mark.parametrize("name,fields,c,chunk", [("tiny-v4", {"pattern": "WCH"}, 4, 1),
                                                 ("tiny-hybrid", {"pattern": "MS", "window": 8}, 4, CHUNK),
                                                 ("tiny-v4", {"pattern": "CH"}, 2, CHUNK)],
                         ids=["WCH-c4-decode", "MS-c4-chunk", "CH-c2-chunk"])
def test_step_bytes_match_cost_model(name, fields, c, chunk):
    """The compiled step (unrolled layers, so each layer's collectives appear once) moves exactly
    `cost.decode_context_bytes` summed over its layers: all-reduces of [b, n, t] stats and [b, t, n, r or c]
    outputs, and C's [b, t, c * k] candidate lists; no cache array is gathered."""
    cfg = preset(name, **fields)
    b = 2
    mesh = make_mesh(context=c)
    with jax.set_mesh(mesh):
        params = jax.device_put(model.init(cfg, jax.random.key(0)), state_shardings(model.abstract(cfg), mesh,
                                                                                    "serve"))
        cache = cache_lib.init_cache(cfg, b, MAX_LEN, mesh=mesh)
        text = jax.jit(lambda p, ca, tok, n: decode.extend(cfg, p, ca, tok, n)).lower(
            params, cache, jnp.zeros((b, chunk), jnp.int32), jnp.full((b,), chunk, jnp.int32)).compile().as_text()
    found = hlo.collectives(text)
    assert {op.op for op in found} <= {"all-reduce", "all-gather"}, found
    local_k = min(cfg.index_topk, MAX_LEN // cfg.csa_compress_ratio // c)
    gathers = [op.shape for op in found if op.op == "all-gather"]
    csa = sum(s.attention is AttentionKind.CSA for s in cfg.layers)
    assert gathers == [(b, chunk, c * local_k)] * 2 * csa  # the candidates' scores and indices, nothing else
    want = sum(cost.decode_context_bytes(cfg, s.attention, c, batch=b, chunk=chunk, value_bytes=4, max_len=MAX_LEN)
               for s in cfg.layers)
    assert want > 0 and hlo.received_bytes(text) == want


def test_decode_context_bytes_worked_examples():
    v4, v3 = preset("deepseek-v4-flash"), preset("deepseek-v3-671b")
    assert cost.decode_context_bytes(v4, AttentionKind.WINDOW, 8) == 0
    assert cost.decode_context_bytes(v3, AttentionKind.FULL, 1) == 0
    # M, one row, one token, 8 shards: max and denominator (128 heads, fp32) and the bf16 latent output (128 x 512),
    # each all-reduced as a ring (2 x 7/8 of the buffer)
    assert cost.decode_context_bytes(v3, AttentionKind.FULL, 8) == 2 * (2 * 128 * 4 * 7 // 8) + 2 * 128 * 512 * 2 * 7 // 8
    h = cost.decode_context_bytes(v4, AttentionKind.HCA, 8, batch=4)
    assert h == 2 * (2 * 4 * 64 * 4 * 7 // 8) + 2 * 4 * 64 * 512 * 2 * 7 // 8
    # C adds the other 7 shards' top-512 candidates (fp32 score + int32 index), fewer when a shard holds fewer
    assert cost.decode_context_bytes(v4, AttentionKind.CSA, 8, batch=4) == h + 7 * 4 * 512 * 8
    assert cost.decode_context_bytes(v4, AttentionKind.CSA, 8, batch=4, max_len=4 * 8 * 100) == h + 7 * 4 * 100 * 8
    # independent of the context length: 231 kB per layer where gathering a 1M-token cache would move 1.2 GB
    assert cost.decode_context_bytes(v3, AttentionKind.FULL, 8) < cost.kv_bytes(v3, AttentionKind.FULL, 1 << 20) / 5000
