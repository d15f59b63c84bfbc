"""The DeepSeek MoE block: shared experts on every token plus top-k routed experts.

Legend: b batch, t time, d model, e experts.
The router is learned top-k (`MlpKind.MOE`) or, for V4's first layers, a frozen token-id table (`MlpKind.HASH`),
which is why the block takes the token ids. V4's `swiglu_limit` clamps routed and shared experts alike.
Returns the output and per-layer statistics: tokens per expert (the load the router bias update balances), the
fraction of routed assignments dropped for capacity, and the bytes the expert-parallel all-to-alls moved.
The routed experts run through `moe/dispatch.py` (`moe_impl`: one device or expert parallel over the mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import MlpKind, ModelConfig
from v4jax.layers.mlp import MLP
from v4jax.moe import dispatch
from v4jax.moe.experts import Experts
from v4jax.moe.routing import HashRouter, Router


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kind: MlpKind = MlpKind.MOE):
        self.cfg = cfg
        std, limit = cfg.initializer_range, cfg.swiglu_limit
        self.router = HashRouter(cfg, rngs) if MlpKind(kind) is MlpKind.HASH else Router(cfg, rngs)
        self.experts = Experts(cfg, rngs=rngs)
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
        with jax.named_scope("moe_router"):
            # Per row, not over x.reshape(b * t, d): with batch and sequence split over different mesh axes
            # (data x context) GSPMD gathers the sequence to merge the two dimensions.
            if self.is_hash and tokens is not None and tokens.size != b * t:
                raise ValueError(f"tokens {tokens.shape} must hold one id per position of x ({b * t} positions)")
            rows = tokens.reshape(b, t) if self.is_hash and tokens is not None else None
            weights, indices = jax.vmap(self.route)(x, rows)
        with jax.named_scope("moe_experts"):
            out = dispatch.routed(self.cfg, self.experts.ffn(x.dtype), x, weights, indices)
        y = out.y
        if self.shared is not None:
            with jax.named_scope("moe_shared"):
                y = y + self.shared(x)
        stats = {
            "expert_load": jnp.bincount(indices.reshape(-1), length=self.cfg.n_routed_experts).astype(jnp.float32),
            "dropped_fraction": out.dropped.mean(dtype=jnp.float32),
            "a2a_bytes": out.a2a_bytes,
        }
        return y, stats
