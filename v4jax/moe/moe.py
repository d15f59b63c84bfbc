"""The DeepSeek MoE block: shared experts on every token plus top-k routed experts.

Legend: b batch, t time, d model, e experts.
The router is learned top-k (`MlpKind.MOE`) or, for V4's first layers, a frozen token-id table (`MlpKind.HASH`),
which is why the block takes the token ids. V4's `swiglu_limit` clamps routed and shared experts alike.
Returns the output and per-layer statistics: tokens per expert (the load the router bias update balances) and the
fraction of routed assignments dropped for capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import MlpKind, ModelConfig, MoeImpl, capacity
from v4jax.layers.mlp import MLP
from v4jax.moe.experts import Experts
from v4jax.moe.routing import HashRouter, Router


def resolve_impl(impl: MoeImpl) -> MoeImpl:
    """`auto`: ragged_dot where it is fast (TPU, GPU), capacity-padded einsum buffers on CPU."""
    if impl is not MoeImpl.AUTO:
        return impl
    return MoeImpl.RAGGED if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else MoeImpl.EINSUM


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kind: MlpKind = MlpKind.MOE):
        self.cfg = cfg
        std, limit = cfg.initializer_range, cfg.swiglu_limit
        self.router = HashRouter(cfg, rngs) if MlpKind(kind) is MlpKind.HASH else Router(cfg, rngs)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, std=std, rngs=rngs,
                               limit=limit)
        self.shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, std=std, rngs=rngs,
                           limit=limit)
                       if cfg.n_shared_experts else None)

    @property
    def is_hash(self) -> bool:
        return isinstance(self.router, HashRouter)

    def route(self, flat: jax.Array, tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """flat [b*t, d] (and token ids [b, t] for a hash layer) -> weights [b*t, k], expert indices [b*t, k]."""
        if not self.is_hash:
            return self.router(flat)
        if tokens is None:
            raise ValueError("a hash-routed MoE layer (MlpKind.HASH) picks experts by token id: "
                             "call it as moe(x, tokens) with tokens int [batch, time]")
        if tokens.size != flat.shape[0]:
            raise ValueError(f"tokens {tokens.shape} must hold one id per position of x ({flat.shape[0]} positions)")
        return self.router(flat, tokens.reshape(-1))

    def __call__(self, x: jax.Array, tokens: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [b, t, d], tokens int [b, t] (hash layers only; ignored otherwise) -> y [b, t, d], statistics."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        with jax.named_scope("moe_router"):
            weights, indices = self.route(flat, tokens)
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
