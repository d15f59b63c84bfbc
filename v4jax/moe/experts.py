"""Routed experts stacked on a leading `experts` axis; `moe/dispatch.py` runs them.

Legend: e experts, d model, f expert width.
"""

from __future__ import annotations

from flax import nnx

from v4jax.layers.linear import param, read
from v4jax.moe.dispatch import FFN
from v4jax.sharding import Axis


class Experts(nnx.Module):
    def __init__(self, n_experts: int, dim: int, hidden: int, *, std: float, rngs: nnx.Rngs,
                 limit: float | None = None):
        self.n_experts = n_experts
        self.limit = limit  # SwiGLU clamp (V4's swiglu_limit); None: unclamped
        self.gate = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, Axis.EXPERT_MLP), std=std)
        self.up = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, Axis.EXPERT_MLP), std=std)
        self.down = param(rngs, (n_experts, hidden, dim), (Axis.EXPERTS, Axis.EXPERT_MLP, Axis.EMBED), std=std)

    def ffn(self, dtype) -> FFN:
        """The weights in the compute dtype, as the dispatch functions take them."""
        return FFN(read(self.gate, dtype), read(self.up, dtype), read(self.down, dtype), self.limit)
