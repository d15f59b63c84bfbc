"""Attention kernels over per-head queries, keys and values.

Legend: b batch, t query time, s key time, n heads, h head dim (qk), v value dim, c query blocks.
All softmax arithmetic is float32. Three implementations with one contract:
  reference  the dense [b, n, t, s] masked softmax, O(t^2) memory: the numerics oracle for the other two;
  blockwise  flash-style online softmax over key blocks for full causal attention; key blocks past the query
             block's diagonal are skipped, and each query block is rematerialised in the backward pass, so
             memory is O(t * block) and a 32K-token forward fits on a laptop;
  banded     sliding-window attention: each query block reads only the keys its window can reach
             (block + window, rounded up to blocks), O(t * window) compute and memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
