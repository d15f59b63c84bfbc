"""Routed experts stacked on a leading `experts` axis (split over `expert`); `moe/dispatch.py` runs them.

Legend: e experts, d model, f expert width.
"""

from __future__ import annotations

from flax import nnx

from v4jax.config import ModelConfig
from v4jax.layers.linear import param, read
from v4jax.moe.dispatch import FFN, width_axis
from v4jax.sharding import Axis


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n_experts, dim, hidden = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        std, width = cfg.initializer_range, width_axis(cfg)
        self.limit = cfg.swiglu_limit  # SwiGLU clamp (V4); None: unclamped
        self.gate = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, width), std=std)
        self.up = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, width), std=std)
        self.down = param(rngs, (n_experts, hidden, dim), (Axis.EXPERTS, width, Axis.EMBED), std=std)

    def ffn(self, dtype) -> FFN:
        """The weights in the compute dtype, as the dispatch functions take them."""
        return FFN(read(self.gate, dtype), read(self.up, dtype), read(self.down, dtype), self.limit)
