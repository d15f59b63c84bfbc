"""The DeepSeek MoE block: shared experts on every token plus top-k routed experts.

Legend: b batch, t time, d model, e experts.
Returns the output and per-layer statistics: tokens per expert (the load the router bias update balances) and the
fraction of routed assignments dropped for capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig, MoeImpl, capacity
from v4jax.layers.mlp import MLP
from v4jax.moe.experts import Experts
from v4jax.moe.routing import Router


def resolve_impl(impl: MoeImpl) -> MoeImpl:
    """`auto`: ragged_dot where it is fast (TPU, GPU), capacity-padded einsum buffers on CPU."""
    if impl is not MoeImpl.AUTO:
        return impl
    return MoeImpl.RAGGED if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else MoeImpl.EINSUM


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        self.router = Router(cfg, rngs)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, std=std, rngs=rngs)
        self.shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, std=std, rngs=rngs)
                       if cfg.n_shared_experts else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        with jax.named_scope("moe_router"):
            weights, indices = self.router(flat)
        with jax.named_scope("moe_experts"):
            impl = resolve_impl(self.cfg.moe_impl)
            if impl is MoeImpl.DENSE:
                routed, dropped = self.experts.dense(flat, weights, indices)
            elif impl is MoeImpl.EINSUM:
                routed, dropped = self.experts.einsum(flat, weights, indices, capacity(self.cfg, b * t))
            else:
                routed, dropped = self.experts.ragged(flat, weights, indices)
        y = routed.reshape(b, t, d)
        if self.shared is not None:
            with jax.named_scope("moe_shared"):
                y = y + self.shared(x)
        stats = {
            "expert_load": jnp.bincount(indices.reshape(-1), length=self.cfg.n_routed_experts).astype(jnp.float32),
            "dropped_fraction": dropped.mean(dtype=jnp.float32),
        }
        return y, stats
