"""RMSNorm, computed in float32 whatever the compute dtype (DESIGN section 7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.layers.linear import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis: str, *, eps: float, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), (axis,), std=None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Cast back before the weight, as the reference does: the product then carries the input's dtype.
        return (self.weight[...] * normed.astype(x.dtype)).astype(x.dtype)
