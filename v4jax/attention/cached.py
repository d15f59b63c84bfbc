"""Attention over a cache: every kind's `extend`, which appends a chunk of tokens to each row's cache and attends.

Legend: b batch, t chunk tokens, s keys, n heads, h qk head dim, v value dim, r MLA latent rank, p rope dims,
c V4 entry width, e cached entry width, w compressed entries, k top-k, i indexer head dim, m compression ratio.

Serving runs prefill chunks (t = chunk) and decode steps (t = 1) through this one path. Row b already holds
`start[b]` tokens and appends `count[b]` real tokens (the rest of its chunk is padding: nothing of it is written,
and count 0 leaves the row untouched), so rows of one batch sit at different positions.

What a layer caches (`cache_shapes`; cost.py predicts these bytes exactly, with `state` included):
  ring         [b, N, e]    S, W and every V4 window branch: the window (N = min(max_len, sliding_window)),
                            slot = position mod N. MLA stores the latent and the rotated rope key (e = r + p), not
                            per-head keys and values; V4 stores the shared K=V entry (e = c).
  latents      [b, L, e]    M: every position's latent and rope key (a ring that never wraps: N = L = max_len).
  entries      [b, L/m, c]  C and H: completed compressed entries, rotated (append-only, index = block).
  index_keys   [b, L/m, i]  C: the lightning indexer's compressed keys.
  state_kv/state_gate, index_state_kv/index_state_gate  float32 [b, S, parts * width]: the compressors' pending
                            projections: the unfinished block (S = m), plus for CSA's overlap the previous block
                            (S = 2m, previous first).
MLA decodes absorbed: queries are mapped into the latent space (q_nope . W_uk) and score the cached latents
directly; the output is taken in latent space and mapped up by W_uv, so per-head keys and values never exist.
Every kind attends over softmax parts: what was cached before the chunk (ring, latents, entries) and the chunk's
own keys, so the cache is never copied into one concatenated key array.

A split cache (flash-decoding over `context`): when the current mesh and rules put `cache_seq` on mesh axes of
product c > 1 (`serve` on a mesh with `context` > 1), the SPLIT_LEAVES arrays whose positions divide by c
(`is_split`: where `serving.cache.cache_shardings` splits them) hold, on shard i, global slots
[i L/c, (i+1) L/c) (entries and index keys: [i w/c, (i+1) w/c)). `extend` then runs in a shard_map manual over
those axes only (`Shard`); the chunk, rings and compressor states are whole and computed alike on every shard.
Each shard scores the chunk's queries against its own slice (a split softmax part) and against the whole parts
(the chunk's keys, the window ring; the sinks once); `kernels.softmax_parts` takes the row max over the shards
(pmax) and sums the split parts' denominators (psum), and the split parts' value products are summed (psum), so
the result is the unsplit one up to float32 summation order. C's top-k: each shard's local top-k candidates are
all-gathered in shard order (ties go to the lower global index, as one `lax.top_k`) and the top-k of those is
chosen; each shard attends to the chosen entries it holds. A new token or completed entry is written only by the
shard holding its slot. Per layer this moves [b, n, t] maxima and sums, the [b, t, n, r or c] output and C's
[b, t, c k] candidates (`cost.decode_context_bytes`), never a cache array.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from v4jax.attention.compressed import V4Attention
from v4jax.attention.compressor import Compressor
from v4jax.attention.kernels import INVALID_SEGMENT, softmax_parts
from v4jax.attention.mla import MLA
from v4jax.config import AttentionKind, ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import read
from v4jax.sharding import Axis, get_rules, logical_to_spec, mesh_axes

LayerCache = dict[str, jax.Array]

# The arrays whose position axis grows with max_len: on a mesh with `context` > 1 they are split along it
# (`Axis.CACHE_SEQ`, the `serve` rules), which is where splitting a long cache pays; rings and compressor states
# are bounded by the window and the ratio and stay whole.
SPLIT_LEAVES = ("latents", "entries", "index_keys")


def ring_name(kind: AttentionKind) -> str:
    """M's window is every position (`latents`); the other kinds keep a `ring` of the window."""
    return "latents" if kind is AttentionKind.FULL else "ring"


def cache_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of one layer's cache array `name` (no `layers` axis): batch first, then `cache_seq` for
    the arrays in SPLIT_LEAVES."""
    return (Axis.BATCH, Axis.CACHE_SEQ if name in SPLIT_LEAVES else None) + (None,) * (ndim - 2)


# ---------------------------------------------------------------------------------------------------------------
# shapes


def cache_shapes(cfg: ModelConfig, kind: AttentionKind, batch: int, max_len: int, dtype) -> LayerCache:
    """jax.ShapeDtypeStruct per cache array of one layer of `kind`."""
    f32 = jnp.float32
    mla = kind in (AttentionKind.FULL, AttentionKind.SLIDING)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim if mla else cfg.head_dim
    ring = max_len if kind is AttentionKind.FULL else min(max_len, cfg.sliding_window)
    shapes = {ring_name(kind): ((batch, ring, width), dtype)}
    ratio = cfg.compress_ratio(kind)
    if ratio and max_len >= ratio:
        csa = kind is AttentionKind.CSA
        slots, parts = (2 * ratio, 2) if csa else (ratio, 1)
        shapes |= {"entries": ((batch, max_len // ratio, cfg.head_dim), dtype),
                   "state_kv": ((batch, slots, parts * cfg.head_dim), f32),
                   "state_gate": ((batch, slots, parts * cfg.head_dim), f32)}
        if csa:
            shapes |= {"index_keys": ((batch, max_len // ratio, cfg.index_head_dim), dtype),
                       "index_state_kv": ((batch, slots, 2 * cfg.index_head_dim), f32),
                       "index_state_gate": ((batch, slots, 2 * cfg.index_head_dim), f32)}
    return {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dt)) for name, (shape, dt) in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------
# the split: the cache's positions over the `cache_seq` mesh axes


class Shard(NamedTuple):
    """Inside `extend`'s shard_map: which slice of the split arrays this shard holds."""

    axes: tuple[str, ...]  # the mesh axes the positions are split over (manual here)
    size: int  # c, their product
    index: jax.Array  # this shard's place along them

    def offset(self, local: int) -> jax.Array:
        """The global index of this shard's first slot of an array holding `local` slots per shard."""
        return self.index * local


def split_axes() -> tuple[str, ...]:
    """The mesh axes (not already manual) that the current mesh and rules put `Axis.CACHE_SEQ` on."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    entry = logical_to_spec((Axis.CACHE_SEQ,), get_rules(), mesh_shape=dict(mesh.shape))[0]
    return tuple(a for a in mesh_axes(entry) if a not in mesh.manual_axes)


def is_split(name: str, shape: tuple[int, ...], size: int) -> bool:
    """Whether cache array `name` of `shape` (no `layers` axis) is split over `size` > 1 shards: an array of
    SPLIT_LEAVES whose positions divide evenly (`serving.cache.cache_shardings` places them so)."""
    return size > 1 and name in SPLIT_LEAVES and shape[1] % size == 0


def _local(array: jax.Array, shard: Shard | None) -> tuple[jax.Array | int, int]:
    """(offset, global length) of a split array's positions: 0 and its own length when whole."""
    n = array.shape[1]
    return (0, n) if shard is None else (shard.offset(n), n * shard.size)


def _attend(probs: list[jax.Array], values: list[tuple[str, jax.Array]], split: tuple[bool, ...],
            shard: Shard | None) -> jax.Array:
    """sum_i probs_i @ values_i, the split parts' products summed over the shards (one psum of the output)."""
    outs = [jnp.einsum(spec, p.astype(v.dtype), v) for p, (spec, v) in zip(probs, values)]
    total = sum(o for o, s in zip(outs, split) if not s)
    if any(split):
        total = total + jax.lax.psum(sum(o for o, s in zip(outs, split) if s), shard.axes)
    return total


# ---------------------------------------------------------------------------------------------------------------
# the ring (window branch, and all of M)


def _chunk_positions(start: jax.Array, t: int) -> jax.Array:
    return start[:, None] + jnp.arange(t, dtype=start.dtype)[None]


def _real(count: jax.Array, t: int) -> jax.Array:
    return jnp.arange(t)[None] < count[:, None]


def ring_positions(start: jax.Array, slots: int, offset=0, size: int | None = None):
    """The position each of `slots` ring slots holds before the chunk [b, slots] and whether it holds a token: slot
    j (global index offset + j of a ring of `size`, default `slots`) holds the latest position before `start`
    that is j mod size (negative: none yet)."""
    size = slots if size is None else size
    last = start[:, None] - 1
    positions = last - jnp.mod(last - (offset + jnp.arange(slots))[None], size)
    return positions, positions >= 0


def ring_write(ring: jax.Array, new: jax.Array, start: jax.Array, count: jax.Array, offset=0,
               size: int | None = None) -> jax.Array:
    """Write the chunk's real tokens at slot position mod N (N = `size`, default the ring's length; a split ring
    holds global slots [offset, offset + its length) and drops the rest); only the last N of them (the rest would
    be overwritten within the chunk, and a scatter's order among duplicates is undefined)."""
    slots, t = ring.shape[1], new.shape[1]
    size = slots if size is None else size
    positions = _chunk_positions(start, t)
    slot = jnp.mod(positions, size) - offset
    keep = _real(count, t) & (positions >= (start + count)[:, None] - size) & (slot >= 0) & (slot < slots)
    slot = jnp.where(keep, slot, slots)  # one past the end: dropped (a negative index would wrap)
    return ring.at[jnp.arange(ring.shape[0])[:, None], slot].set(new.astype(ring.dtype), mode="drop")


def _key_mask(q_pos, key_pos, key_real, window: int | None) -> jax.Array:
    """[b, t], [b, s], [b, s] -> bool [b, 1, t, s]: a real key at or before the query (within the window)."""
    delta = q_pos[:, :, None] - key_pos[:, None, :]
    visible = key_real[:, None, :] & (delta >= 0)
    if window is not None:
        visible = visible & (delta < window)
    return visible[:, None]


# ---------------------------------------------------------------------------------------------------------------
# MLA (M, S)


def mla_extend(attn: MLA, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array,
               shard: Shard | None = None):
    """Two softmax parts: the cached ring / latents (split over the shards for M on a split cache), and the
    chunk's own keys (the same on every shard)."""
    cfg, dtype, t = attn.cfg, x.dtype, x.shape[1]
    nope, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q_pos = _chunk_positions(start, t)
    name = ring_name(AttentionKind.FULL if attn.window is None else AttentionKind.SLIDING)
    ring = cache[name]
    offset, size = _local(ring, shard)
    with jax.named_scope("mla_projections"):
        q, latent, k_rope = attn.project(x, q_pos)
        new = jnp.concatenate([latent, k_rope], axis=-1).astype(ring.dtype)
        w_uk, w_uv = jnp.split(read(attn.wkv_b, dtype), [nope], axis=-1)
        q_latent = jnp.einsum("btnh,rnh->btnr", q[..., :nope], w_uk)

    def part(keys, key_pos, key_real):
        keys = keys.astype(dtype)
        scores = (jnp.einsum("btnr,bsr->bnts", q_latent, keys[..., :r], preferred_element_type=jnp.float32)
                  + jnp.einsum("btnp,bsp->bnts", q[..., nope:], keys[..., r:], preferred_element_type=jnp.float32))
        return (scores * attn.scale, _key_mask(q_pos, key_pos, key_real, attn.window)), ("bnts,bsr->btnr",
                                                                                           keys[..., :r])

    with jax.named_scope("mla_absorbed"):
        cached, cached_values = part(ring, *ring_positions(start, ring.shape[1], offset, size))
        chunk, chunk_values = part(new, q_pos, _real(count, t))
        split = (shard is not None, False)
        probs = softmax_parts([cached, chunk], split=split, axes=shard.axes if shard else ())
        out_latent = _attend(probs, [cached_values, chunk_values], split, shard)
        out = jnp.einsum("btnr,rnv->btnv", out_latent, w_uv)
    with jax.named_scope("mla_output"):
        y = jnp.einsum("btnv,nvd->btd", out, read(attn.wo, dtype))
    return y, {name: ring_write(ring, new, start, count, offset, size)}


# ---------------------------------------------------------------------------------------------------------------
# compressors: the pending block and completed entries


def compress_extend(compressor: Compressor, x, entries, state_kv, state_gate, start, count, rotate, held_from=0):
    """Feed the chunk into a compressor: entries of blocks completed by it are pooled, rotated (`rotate(entries,
    block start positions)`) and written; the pending state moves on. Returns (entries, state_kv, state_gate).
    Split entries hold global indices [held_from, held_from + their length): a shard writes the completed entries it
    holds and drops the others (the pending state is whole, the same on every shard).

    Each row's state and chunk are laid out as one stream aligned to block boundaries: [previous block (overlap
    only) | unfinished block | ...], the chunk placed at the unfinished block's fill point. Candidate blocks are
    pooled together; those the chunk completes are written, and the state becomes the stream's slots around the
    row's new fill point."""
    m, t = compressor.ratio, x.shape[1]
    lead = state_kv.shape[1]  # m, or 2m with the previous block first
    first = lead - m  # where the unfinished block starts in the stream
    candidates = (m - 1 + t) // m
    offset = jnp.mod(start, m)
    kv, gate = compressor.projections(x, jnp.mod(_chunk_positions(start, t), m))

    def stream(state, new):
        room = jnp.zeros((state.shape[0], candidates * m + lead, state.shape[-1]), state.dtype)
        room = room.at[:, :lead].set(state)
        return jax.vmap(lambda r, n, at: jax.lax.dynamic_update_slice_in_dim(r, n, at, axis=0))(room, new,
                                                                                                 first + offset)

    kv_stream, gate_stream = stream(state_kv, kv), stream(state_gate, gate)
    blocks = (candidates * m + lead) // m
    block = start[:, None] // m - first // m + jnp.arange(blocks)[None]  # global block index of each stream block
    complete = (jnp.arange(candidates)[None] + 1) * m <= (offset + count)[:, None]
    index = block[:, first // m:first // m + candidates] - held_from
    write = complete & (index >= 0) & (index < entries.shape[1])

    def pool_and_write(entries):
        pooled = compressor.pool(kv_stream.reshape(*kv_stream.shape[:1], blocks, m, -1),
                                 gate_stream.reshape(*gate_stream.shape[:1], blocks, m, -1),
                                 jnp.where(block >= 0, 0, INVALID_SEGMENT))
        pooled = rotate(pooled[:, first // m:first // m + candidates], (index + held_from) * m)
        rows = jnp.arange(entries.shape[0])[:, None]
        return entries.at[rows, jnp.where(write, index, entries.shape[1])].set(pooled.astype(entries.dtype),
                                                                               mode="drop")

    # A decode step completes a block once every m steps: pool only then (on XLA:CPU the pool's weighted sum is a
    # library call of ~150 us even when its result is dropped, a third of a decode step at ratio 128).
    entries = jax.lax.cond(jnp.any(write), pool_and_write, lambda entries: entries, entries)

    fill = (offset + count) // m * m  # the stream block holding the row's next position, as a slot offset
    take = jax.vmap(lambda s, at: jax.lax.dynamic_slice_in_dim(s, at, lead, axis=0))
    return entries, take(kv_stream, fill), take(gate_stream, fill)


# ---------------------------------------------------------------------------------------------------------------
# V4 (W, C, H)


def v4_extend(attn: V4Attention, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array,
              shard: Shard | None = None):
    """Softmax parts: the window ring and the chunk's own entries (whole), then the compressed entries (split
    over the shards on a split cache); the sinks count once."""
    cfg, dtype, t = attn.cfg, x.dtype, x.shape[1]
    q_pos = _chunk_positions(start, t)
    cos, sin = attn.rope_tables(q_pos)
    q_latent, q, kv = attn.project(x, cos, sin)
    ring = cache["ring"]

    def part(keys, key_pos, key_real):
        keys = keys.astype(ring.dtype).astype(dtype)
        scores = jnp.einsum("btnc,bsc->bnts", q, keys, preferred_element_type=jnp.float32) * attn.scale
        return (scores, _key_mask(q_pos, key_pos, key_real, cfg.sliding_window)), ("bnts,bsc->btnc", keys)

    with jax.named_scope("v4_window"):
        (ring_part, ring_values), (chunk_part, chunk_values) = (part(ring, *ring_positions(start, ring.shape[1])),
                                                                part(kv, q_pos, _real(count, t)))
        parts, values = [ring_part, chunk_part], [ring_values, chunk_values]
    new_cache = {"ring": ring_write(ring, kv, start, count)}
    if "entries" in cache:
        part, value, compressed = _compressed_part(attn, x, q, q_latent, q_pos, cache, start, count, shard)
        parts.append(part)
        values.append(value)
        new_cache |= compressed
    split = (False, False, shard is not None)[:len(parts)]
    with jax.named_scope("v4_kernel"):
        probs = softmax_parts(parts, attn.sinks[...].astype(jnp.float32), split, shard.axes if shard else ())
        out = _attend(probs, values, split, shard)
    return attn.output(out, cos, sin), new_cache


def _compressed_part(attn: V4Attention, x, q, q_latent, q_pos, cache, start, count, shard: Shard | None):
    """Scores of the chunk's queries against the compressed entries they may see (all visible ones for H, the
    indexer's top-k for C), with the value einsum and the updated compressor caches. On a split cache, this
    shard's entries only (C: those of the global top-k it holds)."""
    def rotate(values, positions):
        return rope.rotate_tail(values, *attn.rope_tables(positions))

    offset, _ = _local(cache["entries"], shard)
    with jax.named_scope("v4_compressor"):
        entries, state_kv, state_gate = compress_extend(attn.compressor, x, cache["entries"], cache["state_kv"],
                                                        cache["state_gate"], start, count, rotate, offset)
    updated = {"entries": entries, "state_kv": state_kv, "state_gate": state_gate}
    complete = ((q_pos + 1) // attn.ratio)[..., None]  # [b, t, 1]: entries (global index) each query sees
    visible = (offset + jnp.arange(entries.shape[1]))[None, None] < complete  # [b, t, w]
    entries = entries.astype(q.dtype)
    if attn.indexer is None:
        scores = jnp.einsum("btnc,bwc->bntw", q, entries, preferred_element_type=jnp.float32)
        return (scores * attn.scale, visible[:, None]), ("bnts,bsc->btnc", entries), updated
    with jax.named_scope("v4_indexer"):
        indexer = attn.indexer
        index_keys, index_kv, index_gate = compress_extend(indexer.compressor, x, cache["index_keys"],
                                                           cache["index_state_kv"], cache["index_state_gate"],
                                                           start, count, rotate, offset)
        updated |= {"index_keys": index_keys, "index_state_kv": index_kv, "index_state_gate": index_gate}
        selection = indexer.select(x, q_latent, q_pos, attn.rope_tables, index_keys.astype(jnp.float32))
        scores = jnp.where(visible, selection.scores(selection.queries, selection.weights), -jnp.inf)
        chosen = _top_k(scores, selection.topk, offset, shard)  # global indices [b, t, k]
        held = chosen - offset
        mine = (held >= 0) & (held < entries.shape[1])
        real = (chosen < complete) & mine
        gathered = jax.vmap(lambda e, index: e[index])(entries, jnp.where(mine, held, 0))  # [b, t, k, c]
    scores = jnp.einsum("btnc,btkc->bntk", q, gathered, preferred_element_type=jnp.float32)
    return (scores * attn.scale, real[:, None]), ("bntk,btkc->btnc", gathered), updated


def _top_k(scores: jax.Array, topk: int, offset, shard: Shard | None) -> jax.Array:
    """The global indices [b, t, k] of the top min(topk, entries) scores of [b, t, w], ties to the lower index (as
    `lax.top_k`). Split: each shard's own top-k candidates, gathered in shard order (so ties still resolve to
    the lower global index), then the top-k of those; only the [b, t, c * k] candidate lists move."""
    if shard is None:
        return jax.lax.top_k(scores, min(topk, scores.shape[-1]))[1]
    local, index = jax.lax.top_k(scores, min(topk, scores.shape[-1]))
    local, index = (jax.lax.all_gather(a, shard.axes, axis=-1, tiled=True) for a in (local, index + offset))
    pick = jax.lax.top_k(local, min(topk, scores.shape[-1] * shard.size))[1]
    return jnp.take_along_axis(index, pick, axis=-1)


def extend(attn, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array):
    """Any attention kind: x [b, t, d] -> (y [b, t, d], the layer's updated cache). When the current mesh and
    rules split this layer's cache along positions (`is_split`), it runs inside a shard_map manual over those
    mesh axes only (the others stay with GSPMD): the split arrays stay where they are, everything else is whole
    on every shard, and the shards merge their softmax parts exactly (`kernels.softmax_parts`)."""
    body = mla_extend if isinstance(attn, MLA) else v4_extend
    axes = split_axes()
    size = math.prod(dict(jax.sharding.get_abstract_mesh().shape)[a] for a in axes)
    split = {name for name, leaf in cache.items() if is_split(name, leaf.shape, size)}
    if not split:
        return body(attn, x, cache, start, count)
    graphdef, state = nnx.split(attn)

    def run(state, x, cache, start, count):
        return body(nnx.merge(graphdef, state), x, cache, start, count,
                    Shard(axes, size, jax.lax.axis_index(axes)))

    specs = {name: P(None, axes) if name in split else P() for name in cache}
    # y and the whole arrays are the same on every shard (computed alike, or after the psums), which the
    # varying-axes check cannot see: it is off, as in `attention.context`.
    fn = jax.shard_map(run, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(), P(), specs, P(), P()),
                       out_specs=(P(), specs), axis_names=set(axes), check_vma=False)
    with jax.named_scope("context_extend"):
        return fn(state, x, cache, start, count)
