"""Prefill and decode steps over the serving cache.

Both are one jitted function, `extend`: a chunk of tokens per row appended after the row's cached tokens (its own
position), attending through the cache (`attention/cached.py`). Prefill runs fixed-size chunks (a long prompt is
several calls of one compiled shape, so new prompt lengths never recompile); a decode step is a chunk of one token.
On a mesh with `context` > 1, a prompt longer than one chunk into empty rows is instead one call with its sequence
split over `context` (`attention/context.py`'s `prefill`), padded to `split_prefill_length`.
The cache argument is donated. Traced under the `serve` sharding rules: on a mesh, rows follow the cache's
sharding and weights stay where `model.init(..., rules="serve")` put them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import model
from v4jax.config import AttentionKind, ModelConfig
from v4jax.serving.cache import Cache, cache_shardings
from v4jax.sharding import Axis, Preset, logical_to_spec, mesh_axes, mesh_rules, use_rules


def _constrain_cache(cache: Cache) -> Cache:
    """Pin every cache leaf to its sharding so the donated buffers come back in the same layout."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, cache_shardings(cache, mesh))


def _extend(cfg: ModelConfig, params: nnx.State, cache: Cache, tokens: jax.Array, counts: jax.Array, *,
            last=None, fresh: bool = False):
    # A fresh prefill may split its sequence over `context` (the long rules' seq axis); decode keeps it whole.
    rules = mesh_rules(jax.sharding.get_abstract_mesh(), Preset.SERVE) if fresh else Preset.SERVE
    with use_rules(rules):
        transformer = nnx.merge(model.graphdef(cfg), params)
        logits, layers = transformer.extend(tokens, cache.layers, cache.lengths, counts, last=last, fresh=fresh)
        prefix, unit, suffix = layers
        updated = cache.replace(prefix=prefix, unit=unit, suffix=suffix, lengths=cache.lengths + counts)
    return logits, _constrain_cache(updated)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _extend_jit(cfg, params, cache, tokens, counts):
    return _extend(cfg, params, cache, tokens, counts)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def _prefill_chunk(cfg, params, cache, tokens, counts, fresh=False):
    """One prefill chunk: each row's logits at its last real token of the chunk [b, v], and the cache."""
    logits, cache = _extend(cfg, params, cache, tokens, counts, last=jnp.clip(counts - 1, 0), fresh=fresh)
    return logits[:, 0], cache


def extend(cfg: ModelConfig, params: nnx.State, cache: Cache, tokens, counts) -> tuple[jax.Array, Cache]:
    """tokens int32 [b, t], counts int32 [b] (real tokens of each row's chunk) -> logits float32 [b, t, vocab] at
    every chunk position, and the cache (donated) with lengths += counts."""
    return _extend_jit(cfg, params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(counts, jnp.int32))


def prefill(cfg: ModelConfig, params: nnx.State, cache: Cache, tokens, counts, chunk: int = 256):
    """Append right-padded prompts tokens int [b, T] with counts[b] real tokens each, in chunks of `chunk` (or, on
    a mesh with `context` > 1, into empty rows and longer than a chunk: in one pass split over `context`).
    Returns each row's logits at its last real token, float32 [b, vocab] (undefined where counts == 0), and the
    cache. ValueError if a row would exceed the cache."""
    tokens, counts = np.asarray(tokens, np.int32), np.asarray(counts, np.int32)
    if tokens.ndim != 2 or counts.shape != tokens.shape[:1]:
        raise ValueError(f"prefill takes tokens [batch, time] and counts [batch], got {tokens.shape} and "
                         f"{counts.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if (counts < 0).any() or (counts > tokens.shape[1]).any():
        raise ValueError(f"counts must lie in [0, {tokens.shape[1]}], got {counts.tolist()}")
    lengths = np.asarray(cache.lengths)  # one host fetch, before any call donates the cache
    room = cache.max_len - lengths
    if (counts > room).any():
        row = int(np.argmax(counts > room))
        raise ValueError(f"row {row}: {counts[row]} prompt tokens do not fit the cache ({room[row]} of "
                         f"{cache.max_len} positions left)")
    shards, longest = context_shards(), int(counts.max(initial=0))
    split = shards > 1 and longest > chunk and not lengths.any()
    chunks = max(1, math.ceil(longest / chunk))
    width = split_prefill_length(cfg, longest, shards, chunk) if split else chunks * chunk
    padded = np.zeros((tokens.shape[0], width), np.int32)
    padded[:, :min(tokens.shape[1], width)] = tokens[:, :width]
    if split:  # empty rows and a prompt longer than a chunk: one pass with the sequence split over `context`
        return _prefill_chunk(cfg, params, cache, padded, counts, True)
    last = None
    for i in range(chunks):
        chunk_counts = np.clip(counts - i * chunk, 0, chunk).astype(np.int32)
        chunk_last, cache = _prefill_chunk(cfg, params, cache, padded[:, i * chunk:(i + 1) * chunk], chunk_counts)
        last = chunk_last if last is None else jnp.where((chunk_counts > 0)[:, None], chunk_last, last)
    return last, cache


def context_shards() -> int:
    """How many ways a fresh prefill splits its sequence under the current mesh (1: not at all)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shape = dict(mesh.shape)
    spec = logical_to_spec((Axis.SEQ,), mesh_rules(mesh, Preset.SERVE), mesh_shape=shape)
    return math.prod(shape[a] for a in mesh_axes(spec[0]))


def split_prefill_length(cfg: ModelConfig, tokens: int, shards: int, chunk: int) -> int:
    """The padded length of a split prefill of `tokens` tokens: every shard holds whole compressed blocks, an even
    count (M's zig-zag halves) and at least a window's halo; a multiple of `chunk`, so prompt lengths share
    compiled programs in steps of `chunk`."""
    kinds = {spec.attention for spec in cfg.layers}
    per_shard = math.lcm(2, *[cfg.compress_ratio(kind) for kind in kinds if cfg.compress_ratio(kind)])
    halo = cfg.sliding_window - 1 if kinds - {AttentionKind.FULL} else 0
    step = math.lcm(shards * per_shard, chunk)
    return math.ceil(max(tokens, shards * halo) / step) * step


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_jit(cfg, params, cache, tokens, active):
    # One program per step, host arrays in, [b, vocab] out: at batch 1 each extra dispatch (a cast, a slice of
    # the logits) costs a sizeable share of a millisecond-scale step.
    logits, cache = _extend(cfg, params, cache, tokens.astype(jnp.int32)[:, None], active.astype(jnp.int32))
    return logits[:, 0], cache


def decode_step(cfg: ModelConfig, params: nnx.State, cache: Cache, tokens, active) -> tuple[jax.Array, Cache]:
    """One token per row: tokens int [b], active bool [b] (inactive rows are left as they are) -> logits
    float32 [b, vocab] and the cache (donated). The caller keeps rows within `cache.max_len`."""
    return _decode_jit(cfg, params, cache, tokens, active)


def max_len(cache: Cache) -> int:
    return cache.max_len
