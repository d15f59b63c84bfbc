"""Attention kinds behind one interface: `(x, positions, segment_ids) -> y`.

`M` is full multi-head latent attention; `S` is the same MLA restricted to a sliding window and computed on the
band only. Both live in `mla.py`; the kernels (blockwise, banded, and the dense reference) in `kernels.py`.
"""

from __future__ import annotations

from flax import nnx

from v4jax.attention.mla import MLA
from v4jax.config import AttentionKind, ModelConfig


def make(cfg: ModelConfig, kind: AttentionKind, rngs: nnx.Rngs) -> nnx.Module:
    if kind is AttentionKind.FULL:
        return MLA(cfg, window=None, rngs=rngs)
    if kind is AttentionKind.SLIDING:
        return MLA(cfg, window=cfg.sliding_window, rngs=rngs)
    raise ValueError(f"attention kind {kind!r} has no implementation")
