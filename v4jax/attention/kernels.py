"""Attention kernels over per-head queries, keys and values.

Legend: b batch, t query time, s key time, n heads, h head dim (qk), v value dim, c V4 entry dim, w compressed
entries, k top-k, i indexer head dim.
All softmax arithmetic is float32. MLA (`M`, `S`) has three implementations with one contract:
  reference  the dense [b, n, t, s] masked softmax, O(t^2) memory: the numerics oracle for the other two;
  blockwise  flash-style online softmax over key blocks for full causal attention; key blocks past the query
             block's diagonal are skipped, and each query block is rematerialised in the backward pass, so
             memory is O(t * block) and a 32K-token forward fits on a laptop;
  banded     sliding-window attention: each query block reads only the keys its window can reach
             (block + window, rounded up to blocks), O(t * window) compute and memory.

V4 (`W`, `C`, `H`; shared K=V entries, per-head sinks) has `v4_reference` (dense mask over the raw + compressed
entries) and `v4_blockwise`: per query block, the window band, then for `H` every compressed entry (t / 128 of
them) and for `C` only the indexer's top-k entries gathered per query, O(t x k) memory and FLOPs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from v4jax.attention import mask as masks

_NEG = -1e30  # finite "minus infinity": keeps exp() and max() NaN-free on fully masked rows


def reference(q, k, v, segment_ids, scale: float, window: int | None = None) -> jax.Array:
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    visible = masks.full(segment_ids, window)[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    return jnp.einsum("bnts,bsnv->btnv", probs.astype(v.dtype), v)


def _pad_time(x: jax.Array, length: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[b, c*block, ...] -> [c, b, block, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
    """[c, b, block, ...] -> [b, c*block, ...]."""
    c, b, block = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, c * block, *x.shape[3:])


def blockwise(q, k, v, segment_ids, scale: float, block: int) -> jax.Array:
    b, t, n, _ = q.shape
    block = min(block, t)
    padded = math.ceil(t / block) * block
    seg = _pad_time(segment_ids, padded, -1)
    qb, kb, vb = (_blocks(_pad_time(x, padded), block) for x in (q, k, v))
    segb = _blocks(seg, block)
    offsets = jnp.arange(block)

    @jax.checkpoint
    def query_block(i, q_i, seg_i):
        def key_block(carry, j):
            def update(carry):
                m, l, acc = carry
                scores = jnp.einsum("btnh,bsnh->bnts", q_i, kb[j], preferred_element_type=jnp.float32) * scale
                visible = masks.visible(i * block + offsets, j * block + offsets, seg_i, segb[j])[:, None]
                scores = jnp.where(visible, scores, _NEG)
                m_new = jnp.maximum(m, scores.max(-1))
                probs = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                l = l * correction + probs.sum(-1)
                pv = jnp.einsum("bnts,bsnv->bntv", probs.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, l, acc * correction[..., None] + pv

            return jax.lax.cond(j <= i, update, lambda c: c, carry), None

        init = (jnp.full((b, n, block), _NEG, jnp.float32), jnp.zeros((b, n, block), jnp.float32),
                jnp.zeros((b, n, block, v.shape[-1]), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(kb.shape[0]))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.einsum("bntv->btnv", out).astype(v.dtype)

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(qb.shape[0]), qb, segb))
    return _unblock(out)[:, :t]


def banded(q, k, v, segment_ids, scale: float, window: int, block: int) -> jax.Array:
    b, t, n, _ = q.shape
    block = min(block, t)
    padded = math.ceil(t / block) * block
    reach = math.ceil((window - 1) / block) * block  # keys before a query block that its window can touch
    seg = _pad_time(segment_ids, padded, -1)
    # Left-pad keys by `reach` so query block i reads keys [i*block - reach, (i+1)*block) at offset i*block.
    kp, vp = (jnp.pad(_pad_time(x, padded), ((0, 0), (reach, 0), (0, 0), (0, 0))) for x in (k, v))
    segp = jnp.pad(seg, ((0, 0), (reach, 0)), constant_values=-1)
    qb, segb = _blocks(_pad_time(q, padded), block), _blocks(seg, block)
    width = reach + block

    @jax.checkpoint
    def query_block(i, q_i, seg_i):
        start = i * block
        k_i = jax.lax.dynamic_slice_in_dim(kp, start, width, axis=1)
        v_i = jax.lax.dynamic_slice_in_dim(vp, start, width, axis=1)
        seg_k = jax.lax.dynamic_slice_in_dim(segp, start, width, axis=1)
        key_index = start - reach + jnp.arange(width)
        # The left pad (negative key index) is invisible whatever segment id a query carries.
        visible = masks.visible(start + jnp.arange(block), key_index, seg_i, seg_k, window) & (key_index >= 0)
        visible = visible[:, None]
        scores = jnp.einsum("btnh,bsnh->bnts", q_i, k_i, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1)
        probs = jnp.where(visible, probs, 0.0)
        return jnp.einsum("bnts,bsnv->btnv", probs.astype(v_i.dtype), v_i)

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(qb.shape[0]), qb, segb))
    return _unblock(out)[:, :t]


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V4: window branch + compressed entries + sinks


@struct.dataclass
class Selection:
    """The lightning indexer's inputs; the top-k is taken per query block inside the kernel."""
    queries: jax.Array  # float32 [b, t, h, i]
    weights: jax.Array  # float32 [b, t, h]
    keys: jax.Array  # float32 [b, w, i]
    topk: int = struct.field(pytree_node=False)
    scale: float = struct.field(pytree_node=False)

    def scores(self, queries, weights) -> jax.Array:
        """[b, t, h, i], [b, t, h] -> [b, t, w]: sum_h weight * relu(q . k) * scale."""
        dots = jnp.einsum("bthi,bwi->bthw", queries, self.keys, preferred_element_type=jnp.float32)
        return jnp.einsum("bthw,bth->btw", jax.nn.relu(dots) * self.scale, weights)


@struct.dataclass
class Compressed:
    entries: jax.Array  # [b, w, c], rotated
    entry_segment: jax.Array  # int [b, w]; INVALID where the block spans two documents
    ratio: int = struct.field(pytree_node=False)
    selection: Selection | None = None  # CSA only

    def visible(self, q_index: jax.Array, q_segment: jax.Array) -> jax.Array:
        """Entry s is visible to query t once its block is complete: s < (t + 1) // m, same document."""
        complete = jnp.arange(self.entries.shape[1])[None, :] < ((q_index + 1) // self.ratio)[:, None]
        return complete[None] & (self.entry_segment[:, None, :] == q_segment[:, :, None])


INVALID_SEGMENT = jnp.iinfo(jnp.int32).min


def _topk_entries(compressed: Compressed, visible, queries, weights):
    """Top-k visible entries per query by index score: indices [b, t, k] and whether each is real (fewer than k
    may be visible)."""
    sel = compressed.selection
    scores = jnp.where(visible, sel.scores(queries, weights), -jnp.inf)
    k = min(sel.topk, compressed.entries.shape[1])
    _, index = jax.lax.top_k(scores, k)
    return index, jnp.take_along_axis(visible, index, axis=-1)


def _softmax_with_sink(parts: list[tuple[jax.Array, jax.Array]], sinks: jax.Array) -> list[jax.Array]:
    """Softmax over the concatenation of several (scores [b, n, t, *], mask) parts plus one sink logit per head,
    the sink's probability dropped. Scores are float32 and already scaled; the sink is not scaled."""
    masked = [jnp.where(mask, scores, _NEG) for scores, mask in parts]
    sink = sinks[None, :, None]
    top = jnp.maximum(_row_max(masked), sink)
    exps = [jnp.where(mask, jnp.exp(s - top[..., None]), 0.0) for s, (_, mask) in zip(masked, parts)]
    denominator = sum(e.sum(-1) for e in exps) + jnp.exp(sink - top)
    return [e / denominator[..., None] for e in exps]


def _row_max(arrays: list[jax.Array]) -> jax.Array:
    top = arrays[0].max(-1)
    for a in arrays[1:]:
        top = jnp.maximum(top, a.max(-1))
    return top


def v4_reference(q, kv, segment_ids, sinks, scale: float, window: int, block: int,
                 compressed: Compressed | None) -> jax.Array:
    """Dense masks over all raw and compressed entries: the numerics reference for `v4_blockwise`."""
    del block
    scores = jnp.einsum("btnc,bsc->bnts", q, kv, preferred_element_type=jnp.float32) * scale
    parts = [(scores, masks.full(segment_ids, window)[:, None])]
    values = [kv]
    if compressed is not None:
        index = jnp.arange(q.shape[1])
        visible = compressed.visible(index, segment_ids)
        if compressed.selection is not None:
            sel = compressed.selection
            chosen, real = _topk_entries(compressed, visible, sel.queries, sel.weights)
            visible = jnp.any(jax.nn.one_hot(chosen, visible.shape[-1], dtype=bool) & real[..., None], axis=-2)
        entry_scores = jnp.einsum("btnc,bwc->bntw", q, compressed.entries, preferred_element_type=jnp.float32)
        parts.append((entry_scores * scale, visible[:, None]))
        values.append(compressed.entries)
    probs = _softmax_with_sink(parts, sinks)
    return sum(jnp.einsum("bnts,bsc->btnc", p.astype(v.dtype), v) for p, v in zip(probs, values))


def v4_blockwise(q, kv, segment_ids, sinks, scale: float, window: int, block: int,
                 compressed: Compressed | None) -> jax.Array:
    b, t, n, c = q.shape
    block = min(block, t)
    padded = math.ceil(t / block) * block
    reach = math.ceil((window - 1) / block) * block
    seg = _pad_time(segment_ids, padded, -1)
    kvp = jnp.pad(_pad_time(kv, padded), ((0, 0), (reach, 0), (0, 0)))
    segp = jnp.pad(seg, ((0, 0), (reach, 0)), constant_values=-1)
    per_block = {"q": _blocks(_pad_time(q, padded), block), "seg": _blocks(seg, block)}
    if compressed is not None and compressed.selection is not None:
        sel = compressed.selection
        per_block["index_q"] = _blocks(_pad_time(sel.queries, padded), block)
        per_block["index_w"] = _blocks(_pad_time(sel.weights, padded), block)

    @jax.checkpoint
    def query_block(i, inputs):
        start = i * block
        q_index = start + jnp.arange(block)
        key_index = start - reach + jnp.arange(reach + block)
        kv_i = jax.lax.dynamic_slice_in_dim(kvp, start, reach + block, axis=1)
        seg_k = jax.lax.dynamic_slice_in_dim(segp, start, reach + block, axis=1)
        band = masks.visible(q_index, key_index, inputs["seg"], seg_k, window) & (key_index >= 0)
        scores = jnp.einsum("btnc,bsc->bnts", inputs["q"], kv_i, preferred_element_type=jnp.float32) * scale
        parts, values = [(scores, band[:, None])], [("bnts,bsc->btnc", kv_i)]
        if compressed is not None:
            visible = compressed.visible(q_index, inputs["seg"])
            if compressed.selection is None:  # HCA: every entry (t / m of them), masked
                entries, spec, mask = compressed.entries, "bnts,bsc->btnc", visible
                entry_scores = jnp.einsum("btnc,bwc->bntw", inputs["q"], entries, preferred_element_type=jnp.float32)
            else:  # CSA: gather the top-k entries of each query
                chosen, mask = _topk_entries(compressed, visible, inputs["index_q"], inputs["index_w"])
                entries, spec = jax.vmap(lambda e, idx: e[idx])(compressed.entries, chosen), "bntk,btkc->btnc"
                entry_scores = jnp.einsum("btnc,btkc->bntk", inputs["q"], entries, preferred_element_type=jnp.float32)
            parts.append((entry_scores * scale, mask[:, None]))
            values.append((spec, entries))
        probs = _softmax_with_sink(parts, sinks)
        return sum(jnp.einsum(spec, p.astype(v.dtype), v) for p, (spec, v) in zip(probs, values))

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(padded // block), per_block))
    return _unblock(out)[:, :t]
