"""Which keys a query sees: causal by array index, same packed segment, and optionally within a window.

Causality is by index, not by `positions`, so packed documents (positions restarting) stay causal; the segment
test keeps them apart. A window of w means a query sees itself and the w - 1 tokens before it. A negative key
index is a position before the sequence (the halo a context shard's left neighbour would send, or padding): never
visible.
"""

from __future__ import annotations

import jax


def visible(q_index: jax.Array, k_index: jax.Array, q_segment: jax.Array, k_segment: jax.Array,
            window: int | None = None) -> jax.Array:
    """q_index [t], k_index [s], q_segment [b, t], k_segment [b, s] -> bool [b, t, s]."""
    delta = q_index[:, None] - k_index[None, :]
    allowed = (delta >= 0) & (k_index >= 0)[None, :]
    if window is not None:
        allowed = allowed & (delta < window)
    return allowed[None] & (q_segment[:, :, None] == k_segment[:, None, :])

