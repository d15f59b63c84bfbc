"""Context parallelism: attention over a sequence split across the mesh axes of the logical `seq` axis (`context`).

Legend: b batch, t local time (T / c for c shards), d model, H halo length (window - 1), m compression ratio,
w local compressed entries (t / m).

Everything but attention is sequence-local (projections, norms, MoE, mHC, MTP's shift is GSPMD's), so GSPMD runs it
on the split sequence unchanged. Each attention layer runs inside a `shard_map` that is manual over the context axes
only (the other mesh axes stay with GSPMD, so heads stay split over `tensor` and the batch over `data`) and moves
only what its structure needs:

  S      halo: `ppermute` of the left neighbour's last H latents + rope keys (r + p per token), expanded locally;
  W      halo: the left neighbour's last H K=V entries (every V4 layer's window branch does the same);
  M      all-gather of the latents (r + p per token), expanded per head locally. Causal work grows with a
         shard's position, so shards i and c-1-i first swap the second half of their tokens (x, positions,
         segments) and swap the outputs back: each shard then computes one early and one late quarter-chunk, equal
         work for all (zig-zag);
  C, H   the window halo, plus an all-gather of the compressed entries (T / m, with their segments) and, for C, the
         indexer keys; C's overlapping compressors read the left neighbour's last block of x (m tokens).

The kernels see global query and key indices (`kernels`), so every shard computes exactly the unsplit result;
the first shard's halo has negative indices, which no query sees. `cost.context_bytes` gives the bytes each kind
moves; `tests/test_context.py` checks it against the compiled HLO.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from v4jax.attention import cached, kernels
from v4jax.attention.cached import LayerCache
from v4jax.attention.compressed import V4Attention
from v4jax.attention.mla import MLA
from v4jax.sharding import Axis, get_rules, logical_to_spec, mesh_axes


class Split(NamedTuple):
    """The sequence split of the current mesh and rules."""

    mesh: jax.sharding.AbstractMesh
    axes: tuple[str, ...]  # mesh axes the sequence is split over
    size: int  # c, their product

    def shard(self) -> jax.Array:
        """This shard's position along the sequence (inside the shard_map)."""
        return jax.lax.axis_index(self.axes)

    def halo(self, x: jax.Array, length: int) -> jax.Array:
        """The left neighbour's last `length` positions of x [b, t, ...] (zeros on the first shard)."""
        return jax.lax.ppermute(x[:, x.shape[1] - length:], self.axes, [(i, i + 1) for i in range(self.size - 1)])

    def gather(self, x: jax.Array) -> jax.Array:
        """[b, t, ...] per shard -> [b, c * t, ...], shards in order."""
        return jax.lax.all_gather(x, self.axes, axis=1, tiled=True)


def split(t: int) -> Split | None:
    """The split of a `t`-token sequence under the current mesh and rules: None when `seq` maps to no mesh axis of
    size > 1 (one device, or rules without context parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    shape = dict(mesh.shape)
    axes = tuple(a for a in mesh_axes(logical_to_spec((Axis.SEQ,), get_rules(), mesh_shape=shape)[0])
                 if a not in mesh.manual_axes)
    size = math.prod(shape[a] for a in axes)
    if size == 1:
        return None
    if t % size:
        raise ValueError(f"context parallelism: a sequence of {t} tokens cannot be split evenly over mesh axes "
                         f"{axes} of size {size}")
    return Split(mesh, axes, size)


class Fill(NamedTuple):
    """A prefill's request to a body: also build the layer's cache for the first T positions of each row."""

    cache: LayerCache  # this shard's part of the (empty) layer cache: shapes and dtypes
    count: jax.Array  # int [b]: real tokens per row (the rest of the sequence is padding)
    split: frozenset[str]  # the cache arrays split along positions over the context axes


def attend(module: nnx.Module, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """An attention layer over x [b, T, d]: the module itself, or split over the context axes when the mesh and
    rules split the sequence."""
    sp = split(x.shape[1])
    if sp is None:
        return module(x, positions, segment_ids)
    body = _body(module, x.shape[1] // sp.size, sp)
    graphdef, state = nnx.split(module)

    def run(state, x, positions, segment_ids):
        return body(nnx.merge(graphdef, state), sp, x, positions, segment_ids)

    tokens = P(None, sp.axes)
    fn = jax.shard_map(run, mesh=sp.mesh, in_specs=(P(), tokens, tokens, tokens), out_specs=tokens,
                       axis_names=set(sp.axes), check_vma=False)
    with jax.named_scope(f"context_{body.__name__.lstrip('_')}"):
        return fn(state, x, positions, segment_ids)


def prefill(module: nnx.Module, x: jax.Array, cache: LayerCache, count: jax.Array):
    """Serving: the first T = x.shape[1] tokens of rows whose cache is empty (count[b] real, the rest padding)
    -> (y [b, T, d], the layer's cache holding them). Split like `attend` when the rules split the sequence: each
    body also builds its cache from what it already has (`Fill`), so the prompt is never gathered: the window ring
    from each shard's own last tokens (a psum of disjoint writes), M's latents and C/H entries from the gathered
    ones (each shard keeps its own `cache_seq` slice of them), the compressors' pending blocks from the shards
    holding them. Unsplit, it is `cached.extend` from position 0."""
    sp = split(x.shape[1])
    if sp is None:
        return cached.extend(module, x, cache, jnp.zeros_like(count), count)
    body = _body(module, x.shape[1] // sp.size, sp)
    graphdef, state = nnx.split(module)
    b, length = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    split_leaves = _split_leaves(cache, sp)

    def run(state, x, positions, segment_ids, count, cache):
        return body(nnx.merge(graphdef, state), sp, x, positions, segment_ids, Fill(cache, count, split_leaves))

    tokens = P(None, sp.axes)
    cache_specs = {name: P(None, sp.axes) if name in split_leaves else P() for name in cache}
    fn = jax.shard_map(run, mesh=sp.mesh, in_specs=(P(), tokens, tokens, tokens, P(), cache_specs),
                       out_specs=(tokens, cache_specs), axis_names=set(sp.axes), check_vma=False)
    with jax.named_scope(f"context_prefill_{body.__name__.lstrip('_')}"):
        return fn(state, x, positions, jnp.zeros_like(positions), count, cache)


def _split_leaves(cache: LayerCache, sp: Split) -> frozenset[str]:
    """The cache arrays split along positions (`cached.is_split`) over the same axes as the sequence."""
    if cached.split_axes() != sp.axes:
        return frozenset()
    return frozenset(name for name, leaf in cache.items() if cached.is_split(name, leaf.shape, sp.size))


def _body(module: nnx.Module, t: int, sp: Split):
    _check(module, t, sp)
    if isinstance(module, MLA):
        return _mla_full if module.window is None else _mla_window
    return _v4


def _check(module: nnx.Module, t: int, sp: Split) -> None:
    """Shapes the split needs: a halo from one neighbour only, compressed blocks that do not straddle shards."""
    window = module.window if isinstance(module, MLA) else module.cfg.sliding_window
    if window is not None and window - 1 > t:
        raise ValueError(f"context parallelism: a window of {window} needs at least {window - 1} tokens per shard; "
                         f"{t * sp.size} tokens over {sp.size} shards leave {t}")
    ratio = getattr(module, "ratio", 0)
    if ratio and t % ratio:
        raise ValueError(f"context parallelism: {module.kind.value} layers compress blocks of {ratio} tokens, so each "
                         f"of the {sp.size} shards must hold a multiple of {ratio} tokens (got {t})")


def _indices(sp: Split, t: int) -> jax.Array:
    """The global indices of this shard's t tokens."""
    return sp.shard() * t + jnp.arange(t)


def _with_halo(sp: Split, length: int, keys: tuple[jax.Array, ...], segment_ids, index):
    """Prepend the left neighbour's last `length` positions to each of `keys`, the segments and the indices (the
    first shard's halo indices are negative: never visible)."""
    if length == 0:
        return keys, segment_ids, index
    keys = tuple(jnp.concatenate([sp.halo(k, length), k], 1) for k in keys)
    segment_ids = jnp.concatenate([sp.halo(segment_ids, length), segment_ids], 1)
    return keys, segment_ids, jnp.concatenate([index[0] - length + jnp.arange(length), index])


def _mla_window(attn: MLA, sp: Split, x, positions, segment_ids, fill: Fill | None = None):
    t = x.shape[1]
    q, latent, k_rope = attn.project(x, positions)
    index = _indices(sp, t)
    own = (latent, k_rope)
    (latent, k_rope), k_segment_ids, k_index = _with_halo(sp, attn.window - 1, own, segment_ids, index)
    k, v = attn.keys_values(latent, k_rope)
    out = attn.output(attn.attend(q, k, v, segment_ids, q_index=index, k_index=k_index, k_segment_ids=k_segment_ids))
    if fill is None:
        return out
    return out, {"ring": _ring_fill(sp, fill.cache["ring"], jnp.concatenate(own, -1), index, fill.count)}


def _zigzag_pairs(size: int) -> list[tuple[int, int]]:
    return [(i, size - 1 - i) for i in range(size) if i != size - 1 - i]


def _swap_second_half(sp: Split, x: jax.Array) -> jax.Array:
    """Exchange the second half of x [b, t, ...] between shards i and c-1-i (the middle shard of an odd split
    keeps its own)."""
    half = x.shape[1] // 2
    received = jax.lax.ppermute(x[:, half:], sp.axes, _zigzag_pairs(sp.size))
    if sp.size % 2:
        received = jnp.where(sp.shard() == sp.size // 2, x[:, half:], received)
    return jnp.concatenate([x[:, :half], received], 1)


def zigzag_indices(size: int, t: int) -> np.ndarray:
    """[c, t]: the global index of each token a shard computes after the swap: its own first half, then the second
    half of shard c-1-i."""
    half = t // 2
    return np.stack([np.concatenate([i * t + np.arange(half), (size - 1 - i) * t + np.arange(half, t)])
                     for i in range(size)]).astype(np.int32)


def _mla_full(attn: MLA, sp: Split, x, positions, segment_ids, fill: Fill | None = None):
    t = x.shape[1]
    balanced = t % 2 == 0
    if balanced:
        x, positions, segment_ids = (_swap_second_half(sp, a) for a in (x, positions, segment_ids))
        layout = zigzag_indices(sp.size, t)
    else:  # an odd shard length cannot be halved: contiguous, unbalanced
        layout = np.arange(sp.size * t, dtype=np.int32).reshape(sp.size, t)
    q, latent, k_rope = attn.project(x, positions)
    latent, k_rope, k_segment_ids = (sp.gather(a) for a in (latent, k_rope, segment_ids))
    k, v = attn.keys_values(latent, k_rope)
    q_index = jnp.asarray(layout)[sp.shard()]
    out = attn.output(attn.attend(q, k, v, segment_ids, q_index=q_index, k_index=jnp.asarray(layout.reshape(-1)),
                                  k_segment_ids=k_segment_ids))
    out = _swap_second_half(sp, out) if balanced else out
    if fill is None:
        return out
    in_order = jnp.concatenate([latent, k_rope], -1)[:, np.argsort(layout.reshape(-1))]
    return out, {"latents": _own_slice(sp, fill, "latents", in_order)}


def _v4(attn: V4Attention, sp: Split, x, positions, segment_ids, fill: Fill | None = None):
    t = x.shape[1]
    cos, sin = attn.rope_tables(positions)
    q_latent, q, kv = attn.project(x, cos, sin)
    index = _indices(sp, t)
    compressed = None if attn.compressor is None else _compressed(attn, sp, x, q_latent, positions, segment_ids)
    (window_kv,), k_segment_ids, k_index = _with_halo(sp, attn.cfg.sliding_window - 1, (kv,), segment_ids, index)
    out = attn.attend(q, window_kv, segment_ids, compressed, q_index=index, k_index=k_index,
                      k_segment_ids=k_segment_ids)
    out = attn.output(out, cos, sin)
    if fill is None:
        return out
    cache = {"ring": _ring_fill(sp, fill.cache["ring"], kv, index, fill.count)}
    if "entries" in fill.cache:
        cache |= {"entries": _own_slice(sp, fill, "entries", compressed.entries)}
        cache |= _state_fill(sp, attn.compressor, x, index, fill, "state_kv", "state_gate")
    if "index_keys" in fill.cache:
        cache |= {"index_keys": _own_slice(sp, fill, "index_keys", compressed.selection.keys)}
        cache |= _state_fill(sp, attn.indexer.compressor, x, index, fill, "index_state_kv", "index_state_gate")
    return out, cache


def _compressed(attn: V4Attention, sp: Split, x, q_latent, positions, segment_ids) -> kernels.Compressed:
    """This shard's compressed entries (and CSA indexer keys), gathered from every shard."""
    previous = None
    if attn.compressor.overlap:  # the first block also pools the left neighbour's last block
        m = attn.ratio
        first = sp.shard() == 0
        previous = (sp.halo(x, m), jnp.where(first, kernels.INVALID_SEGMENT, sp.halo(segment_ids, m)))
    entries, entry_segment = attn.entries(x, positions, segment_ids, previous)
    entries, entry_segment = sp.gather(entries), sp.gather(entry_segment)
    selection = None
    if attn.indexer is not None:
        keys = sp.gather(attn.index_keys(x, positions, segment_ids, previous))
        selection = attn.indexer.select(x, q_latent, positions, attn.rope_tables, keys)
    return kernels.Compressed(entries, entry_segment, attn.ratio, selection)


# ---------------------------------------------------------------------------------------------------------------
# prefill: a body's cache, from what it already holds (`Fill`)


def _ring_fill(sp: Split, ring: jax.Array, new: jax.Array, index: jax.Array, count: jax.Array) -> jax.Array:
    """The window ring [b, N, e] after each row's first count[b] tokens: slot position mod N holds one of the last
    N real positions. Every shard writes the ones it holds into zeros; the writes are disjoint, so a psum
    assembles the ring exactly (N rows of e values per shard, the only bytes a window layer's prefill adds)."""
    n = ring.shape[1]
    keep = (index[None] < count[:, None]) & (index[None] >= count[:, None] - n)
    slot = jnp.where(keep, index[None] % n, n)  # n is out of range: dropped
    rows = jnp.arange(ring.shape[0])[:, None]
    return jax.lax.psum(jnp.zeros_like(ring).at[rows, slot].set(new.astype(ring.dtype), mode="drop"), sp.axes)


def _own_slice(sp: Split, fill: Fill, name: str, gathered: jax.Array) -> jax.Array:
    """This shard's part of cache array `name` from every position's values gathered in order [b, T', e] (T' = T
    or T / m): positions past T' are zeros and past count junk that no query sees until decode overwrites it."""
    part = fill.cache[name]
    n = part.shape[1]
    offset = sp.shard() * n if name in fill.split else 0
    total = n * sp.size if name in fill.split else n
    gathered = jnp.pad(gathered, ((0, 0), (0, max(total - gathered.shape[1], 0)), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(gathered, offset, n, axis=1).astype(part.dtype)


def _state_fill(sp: Split, compressor, x, index, fill: Fill, kv_name: str, gate_name: str) -> LayerCache:
    """A compressor's pending state after count[b] tokens (`cached.compress_extend`'s layout: [previous block
    (overlap) | unfinished block], float32 projections), assembled like the ring: each shard writes the slots of
    the positions it holds, a psum joins them. Slots past count stay zero (decode fills them before they count)."""
    state = fill.cache[kv_name]
    m, lead = compressor.ratio, state.shape[1]
    kv, gate = compressor.projections(x, index % m)
    first_position = fill.count // m * m - (lead - m)  # [b]: the position of slot 0
    slot = index[None] - first_position[:, None]
    keep = (slot >= 0) & (slot < lead) & (index[None] < fill.count[:, None])
    slot = jnp.where(keep, slot, lead)
    rows = jnp.arange(state.shape[0])[:, None]

    def write(values, like):
        return jax.lax.psum(jnp.zeros_like(like).at[rows, slot].set(values.astype(like.dtype), mode="drop"), sp.axes)

    return {kv_name: write(kv, state), gate_name: write(gate, fill.cache[gate_name])}
