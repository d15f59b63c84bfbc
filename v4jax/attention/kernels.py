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
entries) and `v4_blockwise`: per query block, an online softmax over the window band, then for `H` the compressed
entries visible so far (about t / 128) in chunks, and for `C` the indexer's top-k entries gathered per query, the
indexer scoring only the chunks of entries visible so far (about t / 4) and keeping a running top-k. Chunks of
entries past a query block are skipped, as `blockwise` skips key blocks past the diagonal.

Context parallelism (`context.py`) runs the same kernels on one shard of the sequence: `q_index` / `k_index` give
the global index of each local query and key (default: arange), `k_segment_ids` the keys' segments when the keys
are not the queries (gathered, or with a halo in front). Visibility is decided from those indices alone, so a shard
sees exactly what the unsplit kernel would. A negative key index (the halo of the first shard) is never visible.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from v4jax.attention import mask as masks
from v4jax.layers.chunks import from_chunks, to_chunks

_NEG = -1e30  # finite "minus infinity": keeps exp() and max() NaN-free on fully masked rows


def reference(q, k, v, segment_ids, scale: float, window: int | None = None, *, q_index=None, k_index=None,
              k_segment_ids=None) -> jax.Array:
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    q_index, k_index, k_segment_ids = _defaults(q, k, segment_ids, q_index, k_index, k_segment_ids)
    visible = masks.visible(q_index, k_index, segment_ids, k_segment_ids, window)[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    return jnp.einsum("bnts,bsnv->btnv", probs.astype(v.dtype), v)


_FAR = 2 ** 30  # the index of right-padding keys: after every query, so never visible


def _defaults(q, k, segment_ids, q_index, k_index, k_segment_ids):
    """Global indices (default arange) and the keys' segments (default the queries')."""
    return (jnp.arange(q.shape[1]) if q_index is None else q_index,
            jnp.arange(k.shape[1]) if k_index is None else k_index,
            segment_ids if k_segment_ids is None else k_segment_ids)


def _pad_index(index: jax.Array, length: int, value: int | None = None) -> jax.Array:
    """Pad [t] indices to `length`: with `value`, or (queries) continuing past the last so block maxima hold."""
    extra = length - index.shape[0]
    tail = index[-1] + 1 + jnp.arange(extra) if value is None else jnp.full((extra,), value, index.dtype)
    return jnp.concatenate([index, tail.astype(index.dtype)])


def _pad_time(x: jax.Array, length: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def blockwise(q, k, v, segment_ids, scale: float, block: int, *, q_index=None, k_index=None,
              k_segment_ids=None) -> jax.Array:
    b, t, n, _ = q.shape
    q_index, k_index, k_segment_ids = _defaults(q, k, segment_ids, q_index, k_index, k_segment_ids)
    block = min(block, t)
    padded, k_padded = (math.ceil(x.shape[1] / block) * block for x in (q, k))
    segb = to_chunks(_pad_time(segment_ids, padded, -1), block)
    k_segb = to_chunks(_pad_time(k_segment_ids, k_padded, -1), block)
    qb = to_chunks(_pad_time(q, padded), block)
    kb, vb = (to_chunks(_pad_time(x, k_padded), block) for x in (k, v))
    q_indexb = _pad_index(q_index, padded).reshape(-1, block)
    k_indexb = _pad_index(k_index, k_padded, _FAR).reshape(-1, block)

    @jax.checkpoint
    def query_block(q_i, seg_i, q_index_i):
        def key_block(carry, j):
            def update(carry):
                m, l, acc = carry
                scores = jnp.einsum("btnh,bsnh->bnts", q_i, kb[j], preferred_element_type=jnp.float32) * scale
                visible = masks.visible(q_index_i, k_indexb[j], seg_i, k_segb[j])[:, None]
                scores = jnp.where(visible, scores, _NEG)
                m_new = jnp.maximum(m, scores.max(-1))
                probs = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                l = l * correction + probs.sum(-1)
                pv = jnp.einsum("bnts,bsnv->bntv", probs.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, l, acc * correction[..., None] + pv

            # skip key blocks wholly after the query block (past the diagonal)
            return jax.lax.cond(k_indexb[j].min() <= q_index_i.max(), update, lambda c: c, carry), None

        init = (jnp.full((b, n, block), _NEG, jnp.float32), jnp.zeros((b, n, block), jnp.float32),
                jnp.zeros((b, n, block, v.shape[-1]), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(kb.shape[0]))
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.einsum("bntv->btnv", out).astype(v.dtype)

    out = jax.lax.map(lambda args: query_block(*args), (qb, segb, q_indexb))
    return from_chunks(out)[:, :t]


def banded(q, k, v, segment_ids, scale: float, window: int, block: int, *, q_index=None, k_index=None,
           k_segment_ids=None) -> jax.Array:
    """Keys may start `prefix = s - t` positions before the queries (a context shard's halo), at most `reach`."""
    t = q.shape[1]
    q_index, k_index, k_segment_ids = _defaults(q, k, segment_ids, q_index, k_index, k_segment_ids)
    block = min(block, t)
    padded = math.ceil(t / block) * block
    reach = math.ceil((window - 1) / block) * block  # keys before a query block that its window can touch
    kp, vp, segp, k_indexp = _band_keys((k, v), k_segment_ids, k_index, t, padded, reach)
    qb, segb = to_chunks(_pad_time(q, padded), block), to_chunks(_pad_time(segment_ids, padded, -1), block)
    q_indexb = _pad_index(q_index, padded).reshape(-1, block)
    width = reach + block

    @jax.checkpoint
    def query_block(i, q_i, seg_i, q_index_i):
        start = i * block
        k_i, v_i, seg_k, key_index = _band_slices((kp, vp, segp, k_indexp), start, width)
        visible = masks.visible(q_index_i, key_index, seg_i, seg_k, window)[:, None]
        scores = jnp.einsum("btnh,bsnh->bnts", q_i, k_i, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1)
        probs = jnp.where(visible, probs, 0.0)
        return jnp.einsum("bnts,bsnv->btnv", probs.astype(v_i.dtype), v_i)

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(qb.shape[0]), qb, segb, q_indexb))
    return from_chunks(out)[:, :t]


def _band_keys(values, k_segment_ids, k_index, t: int, padded: int, reach: int):
    """Keys laid out for band slicing: query block i reads [i*block, i*block + reach + block) of each returned
    array. The keys start `prefix = s - t` positions before the queries; they are left-padded to `reach` with an
    index that is never visible (-_FAR) and right-padded to the queries' padded length (+_FAR)."""
    prefix = k_index.shape[0] - t
    if not 0 <= prefix <= reach:
        raise ValueError(f"banded attention: {prefix} keys before the first query, at most {reach} supported")
    left, right = reach - prefix, padded - t

    def lay(x, fill=0):
        pad = [(0, 0)] * x.ndim
        pad[1 if x.ndim > 1 else 0] = (left, right)
        return jnp.pad(x, pad, constant_values=fill)

    index = jnp.concatenate([jnp.full((left,), -_FAR, k_index.dtype), k_index,
                             jnp.full((right,), _FAR, k_index.dtype)])
    return (*(lay(x) for x in values), lay(k_segment_ids, -1), index)


def _band_slices(arrays, start, width: int) -> tuple[jax.Array, ...]:
    """One query block's window of `_band_keys`' arrays: [start, start + width) along time (axis 1; 0 for the
    [s] indices)."""
    return tuple(jax.lax.dynamic_slice_in_dim(x, start, width, axis=1 if x.ndim > 1 else 0) for x in arrays)


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

    def scores(self, queries, weights, keys: jax.Array | None = None) -> jax.Array:
        """[b, t, h, i], [b, t, h] -> [b, t, w]: sum_h weight * relu(q . k) * scale, over `keys` [b, w, i] (by
        default all of them)."""
        keys = self.keys if keys is None else keys
        dots = jnp.einsum("bthi,bwi->bthw", queries, keys, preferred_element_type=jnp.float32)
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


def softmax_parts(parts: list[tuple[jax.Array, jax.Array]], sinks: jax.Array | None = None,
                  split: tuple[bool, ...] | None = None, axes: tuple[str, ...] = ()) -> list[jax.Array]:
    """Softmax over the concatenation of several (scores [b, n, t, *], mask) parts, optionally with one sink logit
    per head in the denominator (its probability dropped). Scores are float32 and already scaled; the sink is not
    scaled. A row with nothing visible and no sink (a padding query in serving) gets zeros, not NaN.

    Inside a shard_map manual over mesh `axes`, a part flagged in `split` holds only this shard's keys (the other
    shards hold the rest; unflagged parts and the sinks are the same on every shard). The row max is then taken
    over all shards (pmax) and the split parts' sums are added up over them (psum) before the unflagged parts'
    and the sink's, which count once: every probability returned is the one the unsplit softmax gives, and the
    caller sums the split parts' value products over `axes` (flash-decoding). Only [b, n, t] statistics move."""
    split = split or (False,) * len(parts)
    masked = [jnp.where(mask, scores, _NEG) for scores, mask in parts]
    top = _row_max(masked)
    if any(split):
        top = jax.lax.pmax(top, axes)
    if sinks is not None:
        top = jnp.maximum(top, sinks[None, :, None])
    exps = [jnp.where(mask, jnp.exp(s - top[..., None]), 0.0) for s, (_, mask) in zip(masked, parts)]
    denominator = sum(e.sum(-1) for e, s in zip(exps, split) if not s)
    if any(split):
        denominator = denominator + jax.lax.psum(sum(e.sum(-1) for e, s in zip(exps, split) if s), axes)
    if sinks is not None:
        denominator = denominator + jnp.exp(sinks[None, :, None] - top)
    denominator = jnp.where(denominator > 0, denominator, 1.0)
    return [e / denominator[..., None] for e in exps]


def _row_max(arrays: list[jax.Array]) -> jax.Array:
    top = arrays[0].max(-1)
    for a in arrays[1:]:
        top = jnp.maximum(top, a.max(-1))
    return top


def v4_reference(q, kv, segment_ids, sinks, scale: float, window: int, block: int,
                 compressed: Compressed | None, *, q_index=None, k_index=None, k_segment_ids=None) -> jax.Array:
    """Dense masks over all raw and compressed entries: the numerics reference for `v4_blockwise`."""
    del block
    q_index, k_index, k_segment_ids = _defaults(q, kv, segment_ids, q_index, k_index, k_segment_ids)
    scores = jnp.einsum("btnc,bsc->bnts", q, kv, preferred_element_type=jnp.float32) * scale
    parts = [(scores, masks.visible(q_index, k_index, segment_ids, k_segment_ids, window)[:, None])]
    values = [kv]
    if compressed is not None:
        visible = compressed.visible(q_index, segment_ids)
        if compressed.selection is not None:
            sel = compressed.selection
            chosen, real = _topk_entries(compressed, visible, sel.queries, sel.weights)
            visible = jnp.any(jax.nn.one_hot(chosen, visible.shape[-1], dtype=bool) & real[..., None], axis=-2)
        entry_scores = jnp.einsum("btnc,bwc->bntw", q, compressed.entries, preferred_element_type=jnp.float32)
        parts.append((entry_scores * scale, visible[:, None]))
        values.append(compressed.entries)
    probs = softmax_parts(parts, sinks)
    return sum(jnp.einsum("bnts,bsc->btnc", p.astype(v.dtype), v) for p, v in zip(probs, values))


# `v4_blockwise`'s defaults (see there): entries whose indexer scores are merged into the running top-k at once, in
# units of the top-k; the most bytes of top-k entries gathered at once.
SPAN_TOPKS = 32
GATHER_BYTES = 2 ** 21


def v4_blockwise(q, kv, segment_ids, sinks, scale: float, window: int, block: int,
                 compressed: Compressed | None, *, chunk: int | None = None, span: int | None = None,
                 gather: int | None = None, q_index=None, k_index=None, k_segment_ids=None) -> jax.Array:
    """Per query block of `block` tokens (each rematerialised in the backward pass): an online softmax, seeded with
    the per-head sink (in the denominator, its probability dropped), over the window band, then

      H  the compressed entries, `chunk` at a time (default `block`); chunks holding no entry the block can see yet
         (entry s is visible to query t iff s < (t + 1) // m) are skipped by `lax.cond`, so a block reads about
         the t / m entries before it rather than all of them;
      C  each query's top-k entries, gathered `gather` queries at a time (default: as many as fit GATHER_BYTES, so
         the gathered rows stay in cache). The lightning indexer scores `chunk` entries at a time (default
         max(block, top-k)), only the chunks the block can see (same skip), into rows of `span` entries (default
         SPAN_TOPKS x top-k, whole chunks; -inf where not visible); each span is merged into a running top-k by
         `lax.top_k` over [running, span]. Running first, so ties keep the lower entry index and the chosen set is
         exactly that of one `lax.top_k` over the whole row, as in `v4_reference`; spans past the block are
         skipped. No gradient reaches the indexer.

    At most one partly visible chunk per query block is computed in vain: one key block's worth for H, one top-k's
    worth of index scores for C. Spans are long because each `lax.top_k` call also heap-sorts its k winners: on
    XLA:CPU a 128-query merge of 512 running + 512 new scores takes ~10 ms, more than scoring the 512, so merging
    often would cost more than the scan; up to SPAN_TOPKS x top-k entries (64K tokens at ratio 4, top-512) there
    is a single span and no merge. Memory per block: O(block x (k + span)) index scores and O(gather x k x c)
    gathered entries (C), O(block x chunk) scores (H).
    """
    b, t, n, c = q.shape
    q_index, k_index, k_segment_ids = _defaults(q, kv, segment_ids, q_index, k_index, k_segment_ids)
    block = min(block, t)
    padded = math.ceil(t / block) * block
    reach = math.ceil((window - 1) / block) * block
    kvp, segp, k_indexp = _band_keys((kv,), k_segment_ids, k_index, t, padded, reach)
    per_block = {"q": to_chunks(_pad_time(q, padded), block),
                 "seg": to_chunks(_pad_time(segment_ids, padded, -1), block),
                 "index": _pad_index(q_index, padded).reshape(-1, block)}
    if compressed is not None:
        w = compressed.entries.shape[1]
        k = 0 if compressed.selection is None else min(compressed.selection.topk, w)
        chunk = min(chunk or max(block, k), w)
        chunks = math.ceil(w / chunk)
        # [chunks, b, chunk, ...]; padded entries carry a segment no query has
        entry_chunks = {"seg": to_chunks(_pad_time(compressed.entry_segment, chunks * chunk, INVALID_SEGMENT),
                                         chunk)}
        if compressed.selection is None:
            entry_chunks["entries"] = to_chunks(_pad_time(compressed.entries, chunks * chunk), chunk)
        else:
            sel = jax.lax.stop_gradient(compressed.selection)
            span = min(math.ceil(max(span or SPAN_TOPKS * k, k) / chunk), chunks) * chunk
            row = k * c * compressed.entries.dtype.itemsize
            gather = max(1, min(gather or GATHER_BYTES // row, block))
            while block % gather:
                gather -= 1
            entry_chunks["keys"] = to_chunks(_pad_time(sel.keys, chunks * chunk), chunk)
            per_block["index_q"] = to_chunks(_pad_time(sel.queries, padded), block)
            per_block["index_w"] = to_chunks(_pad_time(sel.weights, padded), block)

    @jax.checkpoint
    def query_block(i, inputs):
        start = i * block
        q_i, seg_i, q_index = inputs["q"], inputs["seg"], inputs["index"]
        kv_i, seg_k, key_index = _band_slices((kvp, segp, k_indexp), start, reach + block)
        band = masks.visible(q_index, key_index, seg_i, seg_k, window)
        state = (jnp.broadcast_to(sinks[None, :, None], (b, n, block)), jnp.ones((b, n, block), jnp.float32),
                 jnp.zeros((b, n, block, c), jnp.float32))
        scores = jnp.einsum("btnc,bsc->bnts", q_i, kv_i, preferred_element_type=jnp.float32) * scale
        state = _absorb(state, scores, band[:, None], kv_i, "bnts,bsc->bntc")
        if compressed is not None:
            limit = (q_index + 1) // compressed.ratio  # query t sees entries below limit[t] (of its document)
            if compressed.selection is None:
                state = _chunked_entries(state, q_i, seg_i, limit, entry_chunks, chunk, scale)
            else:
                chosen, real = _chunked_topk(sel, inputs["index_q"], inputs["index_w"], seg_i, limit, entry_chunks,
                                             chunk, span, k)
                state = _merge(state, _topk_state(q_i, compressed.entries, chosen, real, scale, gather))
        _, l, acc = state
        return jnp.einsum("bntc->btnc", acc / l[..., None]).astype(kv.dtype)

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(padded // block), per_block))
    return from_chunks(out)[:, :t]


def _merge(a, b):
    """Two online-softmax states over disjoint key sets -> the state over their union."""
    m = jnp.maximum(a[0], b[0])
    ca, cb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * ca + b[1] * cb, a[2] * ca[..., None] + b[2] * cb[..., None]


def _topk_state(q, entries, chosen, real, scale: float, sub: int):
    """The online-softmax state of queries q [b, t, n, c] over their own gathered entries (`chosen` [b, t, k] of
    entries [b, w, c], masked by `real`), `sub` queries' entries gathered at a time."""
    def part(q, chosen, real):  # [b, s, n, c], [b, s, k], [b, s, k] -> [b, s, n] (max, sum), [b, s, n, c]
        gathered = jax.vmap(lambda e, idx: e[idx])(entries, chosen)  # [b, s, k, c]
        scores = jnp.einsum("bskc,bsnc->bskn", gathered, q, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(real[..., None], scores, _NEG)
        m = scores.max(2)
        probs = jnp.where(real[..., None], jnp.exp(scores - m[:, :, None]), 0.0)
        acc = jnp.einsum("bskn,bskc->bsnc", probs.astype(entries.dtype), gathered,
                         preferred_element_type=jnp.float32)
        return m, probs.sum(2), acc

    if sub >= q.shape[1]:
        m, l, acc = part(q, chosen, real)
    else:
        m, l, acc = (from_chunks(x) for x in jax.lax.map(lambda a: part(*a), tuple(to_chunks(x, sub) for x in
                                                                               (q, chosen, real))))
    return jnp.einsum("btn->bnt", m), jnp.einsum("btn->bnt", l), jnp.einsum("btnc->bntc", acc)


def _absorb(state, scores, mask, values, spec: str):
    """Fold one more part into an online softmax: state (running max, denominator [b, n, t], float32 weighted sum
    [b, n, t, c]), scores [b, n, t, s] float32 (scaled), mask broadcastable to them, values read by `spec`."""
    m, l, acc = state
    scores = jnp.where(mask, scores, _NEG)
    m_new = jnp.maximum(m, scores.max(-1))
    probs = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    pv = jnp.einsum(spec, probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return m_new, l * correction + probs.sum(-1), acc * correction[..., None] + pv


def _chunk_visible(first: jax.Array, chunk: int, limit, q_segment, entry_segment) -> jax.Array:
    """Entries first .. first + chunk - 1 for queries with visibility `limit` [t]: bool [b, t, chunk]."""
    complete = (first + jnp.arange(chunk))[None, :] < limit[:, None]
    return complete[None] & (q_segment[:, :, None] == entry_segment[:, None, :])


def _chunked_entries(state, q, q_segment, limit, entry_chunks, chunk: int, scale: float):
    """HCA: every visible compressed entry, a chunk at a time; chunks past the block's last query are skipped."""
    def step(state, xs):
        j, entries, entry_segment = xs

        def update(state):
            visible = _chunk_visible(j * chunk, chunk, limit, q_segment, entry_segment)
            scores = jnp.einsum("btnc,bsc->bnts", q, entries, preferred_element_type=jnp.float32) * scale
            return _absorb(state, scores, visible[:, None], entries, "bnts,bsc->bntc")

        return jax.lax.cond(j * chunk < limit.max(), update, lambda s: s, state), None

    xs = (jnp.arange(entry_chunks["seg"].shape[0]), entry_chunks["entries"], entry_chunks["seg"])
    return jax.lax.scan(step, state, xs)[0]


def _chunked_topk(sel: Selection, queries, weights, q_segment, limit, entry_chunks, chunk: int, span: int, k: int):
    """CSA: the top-k visible entries per query of a block by index score, scoring only chunks the block can see:
    (indices [b, t, k], whether each is a real visible entry). See `v4_blockwise`."""
    b, t = q_segment.shape
    per_span = span // chunk
    chunks = entry_chunks["seg"].shape[0]
    spans = math.ceil(chunks / per_span)
    grouped = [_pad_time(jnp.moveaxis(entry_chunks[name], 0, 1), spans * per_span, fill)
               for name, fill in (("keys", 0), ("seg", INVALID_SEGMENT))]  # [b, spans * per_span, ...]
    keys, seg = (jnp.moveaxis(x.reshape(b, spans, per_span, *x.shape[2:]), (1, 2), (0, 1)) for x in grouped)

    def span_scores(s, keys_s, seg_s):  # -> [b, t, span], -inf where not visible (or never scored)
        def step(_, xs):
            j, keys_j, seg_j = xs
            first = (s * per_span + j) * chunk

            def score(_):
                visible = _chunk_visible(first, chunk, limit, q_segment, seg_j)
                return jnp.where(visible, sel.scores(queries, weights, keys_j), -jnp.inf)

            skipped = jnp.full((b, t, chunk), -jnp.inf, jnp.float32)
            return None, jax.lax.cond(first < limit.max(), score, lambda _: skipped, None)

        scores = jax.lax.scan(step, None, (jnp.arange(per_span), keys_s, seg_s))[1]  # [per_span, b, t, chunk]
        return jnp.moveaxis(scores, 0, 2).reshape(b, t, span)

    values, index = jax.lax.top_k(span_scores(0, keys[0], seg[0]), k)

    def merge(carry, xs):
        s, keys_s, seg_s = xs

        def update(carry):
            values, index = carry
            values, pos = jax.lax.top_k(jnp.concatenate([values, span_scores(s, keys_s, seg_s)], -1), k)
            fresh = jnp.broadcast_to(s * span + jnp.arange(span), (b, t, span))
            return values, jnp.take_along_axis(jnp.concatenate([index, fresh], -1), pos, axis=-1)

        return jax.lax.cond(s * span < limit.max(), update, lambda c: c, carry), None

    if spans > 1:
        (values, index), _ = jax.lax.scan(merge, (values, index), (jnp.arange(1, spans), keys[1:], seg[1:]))
    return index, values > -jnp.inf
