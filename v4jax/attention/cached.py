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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.attention.compressed import V4Attention
from v4jax.attention.compressor import Compressor
from v4jax.attention.kernels import INVALID_SEGMENT, softmax_parts
from v4jax.attention.mla import MLA
from v4jax.config import AttentionKind, ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import read
from v4jax.sharding import Axis

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
# the ring (window branch, and all of M)


def _chunk_positions(start: jax.Array, t: int) -> jax.Array:
    return start[:, None] + jnp.arange(t, dtype=start.dtype)[None]


def _real(count: jax.Array, t: int) -> jax.Array:
    return jnp.arange(t)[None] < count[:, None]


def ring_keys(ring: jax.Array, new: jax.Array, start: jax.Array, count: jax.Array):
    """The ring as it was before the chunk, then the chunk: keys [b, N + t, e], their positions [b, N + t] and
    whether each holds a real token [b, N + t]. Slot j holds the latest position before `start` that is j mod N."""
    n, t = ring.shape[1], new.shape[1]
    last = start[:, None] - 1
    ring_pos = last - jnp.mod(last - jnp.arange(n)[None], n)
    keys = jnp.concatenate([ring, new.astype(ring.dtype)], axis=1)
    positions = jnp.concatenate([ring_pos, _chunk_positions(start, t)], axis=1)
    return keys, positions, jnp.concatenate([ring_pos >= 0, _real(count, t)], axis=1)


def ring_write(ring: jax.Array, new: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
    """Write the chunk's real tokens at slot position mod N; only the last N of them (the rest would be
    overwritten within the chunk, and a scatter's order among duplicates is undefined)."""
    n, t = ring.shape[1], new.shape[1]
    positions = _chunk_positions(start, t)
    keep = _real(count, t) & (positions >= (start + count)[:, None] - n)
    slot = jnp.where(keep, jnp.mod(positions, n), n)  # n is out of range: dropped
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


def mla_extend(attn: MLA, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array):
    cfg, dtype = attn.cfg, x.dtype
    nope, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q_pos = _chunk_positions(start, x.shape[1])
    with jax.named_scope("mla_projections"):
        q, latent, k_rope = attn.project(x, q_pos)
        new = jnp.concatenate([latent, k_rope], axis=-1)
        name = ring_name(AttentionKind.FULL if attn.window is None else AttentionKind.SLIDING)
        keys, key_pos, key_real = ring_keys(cache[name], new, start, count)
        w_uk, w_uv = jnp.split(read(attn.wkv_b, dtype), [nope], axis=-1)
        q_latent = jnp.einsum("btnh,rnh->btnr", q[..., :nope], w_uk)
    with jax.named_scope("mla_absorbed"):
        keys = keys.astype(dtype)
        scores = (jnp.einsum("btnr,bsr->bnts", q_latent, keys[..., :r], preferred_element_type=jnp.float32)
                  + jnp.einsum("btnp,bsp->bnts", q[..., nope:], keys[..., r:], preferred_element_type=jnp.float32))
        (probs,) = softmax_parts([(scores * attn.scale, _key_mask(q_pos, key_pos, key_real, attn.window))])
        out_latent = jnp.einsum("bnts,bsr->btnr", probs.astype(dtype), keys[..., :r])
        out = jnp.einsum("btnr,rnv->btnv", out_latent, w_uv)
    with jax.named_scope("mla_output"):
        y = jnp.einsum("btnv,nvd->btd", out, read(attn.wo, dtype))
    return y, {name: ring_write(cache[name], new, start, count)}


# ---------------------------------------------------------------------------------------------------------------
# compressors: the pending block and completed entries


def compress_extend(compressor: Compressor, x, entries, state_kv, state_gate, start, count, rotate):
    """Feed the chunk into a compressor: entries of blocks completed by it are pooled, rotated (`rotate(entries,
    block start positions)`) and written; the pending state moves on. Returns (entries, state_kv, state_gate).

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
    block_segment = jnp.where(block >= 0, 0, INVALID_SEGMENT)
    pooled = compressor.pool(kv_stream.reshape(*kv_stream.shape[:1], blocks, m, -1),
                             gate_stream.reshape(*gate_stream.shape[:1], blocks, m, -1), block_segment)
    pooled, block = pooled[:, first // m:first // m + candidates], block[:, first // m:first // m + candidates]
    pooled = rotate(pooled, block * m).astype(entries.dtype)
    complete = (jnp.arange(candidates)[None] + 1) * m <= (offset + count)[:, None]
    index = jnp.where(complete, block, entries.shape[1])
    entries = entries.at[jnp.arange(entries.shape[0])[:, None], index].set(pooled, mode="drop")

    fill = (offset + count) // m * m  # the stream block holding the row's next position, as a slot offset
    take = jax.vmap(lambda s, at: jax.lax.dynamic_slice_in_dim(s, at, lead, axis=0))
    return entries, take(kv_stream, fill), take(gate_stream, fill)


# ---------------------------------------------------------------------------------------------------------------
# V4 (W, C, H)


def v4_extend(attn: V4Attention, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array):
    cfg, dtype = attn.cfg, x.dtype
    q_pos = _chunk_positions(start, x.shape[1])
    cos, sin = attn.rope_tables(q_pos)
    q_latent, q, kv = attn.project(x, cos, sin)
    with jax.named_scope("v4_window"):
        keys, key_pos, key_real = ring_keys(cache["ring"], kv, start, count)
        keys = keys.astype(dtype)
        scores = jnp.einsum("btnc,bsc->bnts", q, keys, preferred_element_type=jnp.float32) * attn.scale
        parts = [(scores, _key_mask(q_pos, key_pos, key_real, cfg.sliding_window))]
        values = [("bnts,bsc->btnc", keys)]
    new_cache = {"ring": ring_write(cache["ring"], kv, start, count)}
    if "entries" in cache:
        part, value, compressed = _compressed_part(attn, x, q, q_latent, q_pos, cache, start, count)
        parts.append(part)
        values.append(value)
        new_cache |= compressed
    with jax.named_scope("v4_kernel"):
        probs = softmax_parts(parts, attn.sinks[...].astype(jnp.float32))
        out = sum(jnp.einsum(spec, p.astype(dtype), v) for p, (spec, v) in zip(probs, values))
    return attn.output(out, cos, sin), new_cache


def _compressed_part(attn: V4Attention, x, q, q_latent, q_pos, cache, start, count):
    """Scores of the chunk's queries against the compressed entries they may see (all visible ones for H, the
    indexer's top-k for C), with the value einsum and the updated compressor caches."""
    def rotate(values, positions):
        return rope.rotate_tail(values, *attn.rope_tables(positions))

    with jax.named_scope("v4_compressor"):
        entries, state_kv, state_gate = compress_extend(attn.compressor, x, cache["entries"], cache["state_kv"],
                                                        cache["state_gate"], start, count, rotate)
    updated = {"entries": entries, "state_kv": state_kv, "state_gate": state_gate}
    visible = jnp.arange(entries.shape[1])[None, None] < ((q_pos + 1) // attn.ratio)[..., None]  # [b, t, w]
    entries = entries.astype(q.dtype)
    if attn.indexer is None:
        scores = jnp.einsum("btnc,bwc->bntw", q, entries, preferred_element_type=jnp.float32)
        return (scores * attn.scale, visible[:, None]), ("bnts,bsc->btnc", entries), updated
    with jax.named_scope("v4_indexer"):
        indexer = attn.indexer
        index_keys, index_kv, index_gate = compress_extend(indexer.compressor, x, cache["index_keys"],
                                                           cache["index_state_kv"], cache["index_state_gate"],
                                                           start, count, rotate)
        updated |= {"index_keys": index_keys, "index_state_kv": index_kv, "index_state_gate": index_gate}
        selection = indexer.select(x, q_latent, q_pos, attn.rope_tables, index_keys.astype(jnp.float32))
        scores = jnp.where(visible, selection.scores(selection.queries, selection.weights), -jnp.inf)
        _, chosen = jax.lax.top_k(scores, min(selection.topk, entries.shape[1]))
        real = jnp.take_along_axis(visible, chosen, axis=-1)
        gathered = jax.vmap(lambda e, index: e[index])(entries, chosen)  # [b, t, k, c]
    scores = jnp.einsum("btnc,btkc->bntk", q, gathered, preferred_element_type=jnp.float32)
    return (scores * attn.scale, real[:, None]), ("bntk,btkc->btnc", gathered), updated


def extend(attn, x: jax.Array, cache: LayerCache, start: jax.Array, count: jax.Array):
    """Any attention kind: x [b, t, d] -> (y [b, t, d], the layer's updated cache)."""
    if isinstance(attn, MLA):
        return mla_extend(attn, x, cache, start, count)
    return v4_extend(attn, x, cache, start, count)
