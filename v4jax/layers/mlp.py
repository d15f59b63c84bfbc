"""SwiGLU MLP: down(silu(x W_gate) * (x W_up)). Legend: b batch, t time, d model, f hidden width.

DeepSeek-V4 clamps the pre-activations of every MoE expert (routed and shared) at `swiglu_limit`: the gate from
above only, the up projection on both sides. V3 and the dense first-k MLPs pass no limit and are unclamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.layers.linear import param, read
from v4jax.sharding import Axis, constrain


def swiglu(gate: jax.Array, up: jax.Array, limit: float | None = None) -> jax.Array:
    """silu(gate) * up, with gate <= limit and -limit <= up <= limit when a limit is given."""
    if limit is not None:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, std: float, rngs: nnx.Rngs, limit: float | None = None):
        self.limit = limit
        self.gate = param(rngs, (dim, hidden), (Axis.EMBED, Axis.MLP), std=std)
        self.up = param(rngs, (dim, hidden), (Axis.EMBED, Axis.MLP), std=std)
        self.down = param(rngs, (hidden, dim), (Axis.MLP, Axis.EMBED), std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        gate = jnp.einsum("...d,df->...f", x, read(self.gate, dtype))
        up = jnp.einsum("...d,df->...f", x, read(self.up, dtype))
        h = swiglu(gate, up, self.limit)
        if h.ndim == 3:
            h = constrain(h, (Axis.BATCH, Axis.SEQ, Axis.MLP))
        return jnp.einsum("...f,fd->...d", h, read(self.down, dtype))
