"""The output head fused with the cross-entropy: per-token losses without a [b, t, v] logits array.

Legend: b batch, t time, c tokens of one chunk, d model, v vocab.

With a 129K vocabulary the float32 logits are the biggest activation of a step (1 GiB at 4 x 512 tokens, GiBs per
chip at pretraining batch sizes) and the softmax over them is memory-bound: a plain head + logsumexp writes the
logits, reads them for the max, the exp, the gather and again in the backward pass. Here the sequence is cut into
chunks of `chunk` positions and each chunk's logits live only inside one scan step: the forward pass keeps the
log-partition per token, the backward pass recomputes the chunk's logits and turns them straight into the head's
gradients. That is one more [c, d] x [d, v] matmul per chunk (the recompute) for no logits in memory; on a CPU it
is about 3x faster at the bench's shapes, because the logits no longer stream through main memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from v4jax.layers.chunks import from_chunks, to_chunks


def _logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)


def _forward(h, kernel, targets, size):
    def one(_, chunk):
        h_c, targets_c = chunk
        logits = _logits(h_c, kernel)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0]
        return None, (log_z - target_logit, log_z)

    _, (ce, log_z) = jax.lax.scan(one, None, (to_chunks(h, size), to_chunks(targets, size)))
    return from_chunks(ce), from_chunks(log_z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h, kernel, targets, size):
    return _forward(h, kernel, targets, size)


def _fused_fwd(h, kernel, targets, size):
    ce, log_z = _forward(h, kernel, targets, size)
    return (ce, log_z), (h, kernel, targets, log_z)


def _fused_bwd(size, residuals, cotangents):
    h, kernel, targets, log_z = residuals
    d_ce, d_log_z = cotangents
    vocab = kernel.shape[1]

    def one(d_kernel, chunk):
        h_c, targets_c, log_z_c, d_ce_c, d_log_z_c = chunk
        probs = jnp.exp(_logits(h_c, kernel) - log_z_c[..., None])
        # d ce / d logits = softmax - onehot(target); d log_z / d logits = softmax
        d_logits = probs * (d_ce_c + d_log_z_c)[..., None]
        d_logits = d_logits - jax.nn.one_hot(targets_c, vocab, dtype=d_logits.dtype) * d_ce_c[..., None]
        d_logits = d_logits.astype(h.dtype)
        d_h = jnp.einsum("bcv,dv->bcd", d_logits, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum("bcd,bcv->dv", h_c, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, d_h.astype(h.dtype)

    chunks = tuple(to_chunks(x, size) for x in (h, targets, log_z, d_ce, d_log_z))
    d_kernel, d_h = jax.lax.scan(one, jnp.zeros(kernel.shape, jnp.float32), chunks)
    return from_chunks(d_h), d_kernel.astype(kernel.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def head_cross_entropy(h: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition, float32 [b, t], of logits = h [b, t, d] @ kernel [d, v]
    (computed in h's dtype, accumulated in float32) against int targets [b, t], `chunk` positions at a time.
    Both outputs are differentiable (the log-partition feeds the z-loss)."""
    if h.ndim != 3 or targets.shape != h.shape[:2]:
        raise ValueError(f"h must be [b, t, d] and targets [b, t], got {h.shape} and {targets.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    length = h.shape[1]
    size = min(chunk, length)
    pad = -length % size  # the scan needs equal chunks: pad the tail, drop its losses (their cotangents are zero)
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    ce, log_z = _fused(h, kernel, targets, size)
    return ce[:, :length], log_z[:, :length]
