"""Cutting the time axis into equal chunks for `lax.scan` / `lax.map` over them (attention blocks, loss chunks).

The chunk index goes first and the batch axis stays whole inside every chunk, so a batch-sharded array keeps its
sharding through the reshape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_chunks(x: jax.Array, size: int) -> jax.Array:
    """[b, n * size, ...] -> [n, b, size, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def from_chunks(x: jax.Array) -> jax.Array:
    """[n, b, size, ...] -> [b, n * size, ...]."""
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])
