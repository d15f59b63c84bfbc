"""SwiGLU MLP: down(silu(x W_gate) * (x W_up)). Legend: b batch, t time, d model, f hidden width."""

from __future__ import annotations

import jax
from flax import nnx

from v4jax.layers.linear import param, read
from v4jax.sharding import Axis, constrain


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, std: float, rngs: nnx.Rngs):
        self.gate = param(rngs, (dim, hidden), (Axis.EMBED, Axis.MLP), std=std)
        self.up = param(rngs, (dim, hidden), (Axis.EMBED, Axis.MLP), std=std)
        self.down = param(rngs, (hidden, dim), (Axis.MLP, Axis.EMBED), std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jax.numpy.einsum("...d,df->...f", x, read(self.gate, dtype))
        up = jax.numpy.einsum("...d,df->...f", x, read(self.up, dtype))
        h = jax.nn.silu(gate) * up
        if h.ndim == 3:
            h = constrain(h, (Axis.BATCH, Axis.SEQ, Axis.MLP))
        return jax.numpy.einsum("...f,fd->...d", h, read(self.down, dtype))
