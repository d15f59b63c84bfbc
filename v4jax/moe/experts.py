"""Routed experts stacked on a leading `experts` axis, and the grouped matmul that runs them.

Legend: n tokens, d model, e experts, c capacity slots per expert, f expert width, k top-k, a assignments (n*k).
Three back ends, one contract `(x [n, d], weights [n, k], indices [n, k]) -> (y [n, d], dropped [a] bool)`:
  dense    every expert on every token, weighted by the (mostly zero) combine matrix: the reference;
  einsum   assignments sorted by expert into capacity-padded [e, c, d] buffers and one batched einsum
           (the CPU default: XLA:CPU's ragged_dot is 30-90x slower than an einsum of the same FLOPs);
  ragged   assignments sorted by expert and `jax.lax.ragged_dot` over the groups (dropless; TPU/GPU).
Every back end applies the same SwiGLU (`layers.mlp.swiglu`, clamped at `limit` when one is given).
An assignment past its expert's capacity is dropped (its contribution is zero; the shared expert and the residual
still carry the token) and reported, never silent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.layers.linear import param, read
from v4jax.layers.mlp import swiglu
from v4jax.sharding import Axis, constrain


class Experts(nnx.Module):
    def __init__(self, n_experts: int, dim: int, hidden: int, *, std: float, rngs: nnx.Rngs,
                 limit: float | None = None):
        self.n_experts = n_experts
        self.limit = limit  # SwiGLU clamp (V4's swiglu_limit); None: unclamped
        self.gate = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, Axis.EXPERT_MLP), std=std)
        self.up = param(rngs, (n_experts, dim, hidden), (Axis.EXPERTS, Axis.EMBED, Axis.EXPERT_MLP), std=std)
        self.down = param(rngs, (n_experts, hidden, dim), (Axis.EXPERTS, Axis.EXPERT_MLP, Axis.EMBED), std=std)

    def dense(self, x, weights, indices):
        dtype = x.dtype
        h = swiglu(jnp.einsum("nd,edf->nef", x, read(self.gate, dtype)),
                   jnp.einsum("nd,edf->nef", x, read(self.up, dtype)), self.limit)
        out = jnp.einsum("nef,efd->ned", h, read(self.down, dtype))
        combine = jnp.zeros((x.shape[0], self.n_experts), jnp.float32)
        combine = combine.at[jnp.arange(x.shape[0])[:, None], indices].add(weights)
        y = jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine)
        return y.astype(dtype), jnp.zeros(indices.size, bool)

    def einsum(self, x, weights, indices, capacity: int):
        n, k = indices.shape
        e, dtype = self.n_experts, x.dtype
        expert, order, slot_in_expert = _sort_assignments(indices, e)
        kept = slot_in_expert < capacity
        # Row of each sorted assignment in the flattened [e * c] buffer; dropped ones point past the end.
        row = jnp.where(kept, expert[order] * capacity + slot_in_expert, e * capacity)
        token = order // k
        buffer = jnp.zeros((e * capacity, x.shape[1]), dtype).at[row].set(x[token], mode="drop")
        buffer = constrain(buffer.reshape(e, capacity, -1), (Axis.EXPERTS, Axis.CAPACITY, Axis.EMBED))
        h = swiglu(jnp.einsum("ecd,edf->ecf", buffer, read(self.gate, dtype)),
                   jnp.einsum("ecd,edf->ecf", buffer, read(self.up, dtype)), self.limit)
        out = jnp.einsum("ecf,efd->ecd", h, read(self.down, dtype)).reshape(e * capacity, -1)
        per_sorted = jnp.where(kept[:, None], out.at[row].get(mode="fill", fill_value=0), 0)
        dropped = jnp.zeros(n * k, bool).at[order].set(~kept)
        return _combine(per_sorted, order, weights), dropped

    def ragged(self, x, weights, indices):
        n, k = indices.shape
        dtype = x.dtype
        expert, order, _ = _sort_assignments(indices, self.n_experts)
        group_sizes = jnp.bincount(expert, length=self.n_experts).astype(jnp.int32)
        xs = x[order // k]
        h = swiglu(jax.lax.ragged_dot(xs, read(self.gate, dtype), group_sizes),
                   jax.lax.ragged_dot(xs, read(self.up, dtype), group_sizes), self.limit)
        out = jax.lax.ragged_dot(h, read(self.down, dtype), group_sizes)
        return _combine(out, order, weights), jnp.zeros(n * k, bool)


def _sort_assignments(indices: jax.Array, n_experts: int):
    """Flat expert ids [a], the stable order sorting assignments by expert, and each one's slot in its expert."""
    expert = indices.reshape(-1)
    order = jnp.argsort(expert, stable=True)
    sorted_expert = expert[order]
    starts = jnp.cumsum(jnp.bincount(expert, length=n_experts)) - jnp.bincount(expert, length=n_experts)
    slot_in_expert = jnp.arange(expert.size) - starts[sorted_expert]
    return expert, order, slot_in_expert


def _combine(per_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Sorted per-assignment outputs [a, d] -> weighted sum per token [n, d] (weights applied in float32)."""
    n, k = weights.shape
    per_assignment = jnp.zeros_like(per_sorted).at[order].set(per_sorted).reshape(n, k, -1)
    y = jnp.einsum("nkd,nk->nd", per_assignment.astype(jnp.float32), weights)
    return y.astype(per_sorted.dtype)
