"""Attention kinds behind one interface: `(x, positions, segment_ids) -> y`.

`M` is full multi-head latent attention; `S` is the same MLA restricted to a sliding window and computed on the
band only (`mla.py`). `W`, `C`, `H` are DeepSeek-V4's shared-KV attention with a window branch, plus compressed
entries for `C` (top-k by the lightning indexer) and `H` (all of them) (`compressed.py`, `indexer.py`). The
kernels, with their dense references, are in `kernels.py`.
"""

from __future__ import annotations

from flax import nnx

from v4jax.attention.compressed import V4Attention
from v4jax.attention.mla import MLA
from v4jax.config import AttentionKind, ModelConfig


def make(cfg: ModelConfig, kind: AttentionKind, rngs: nnx.Rngs) -> nnx.Module:
    if kind is AttentionKind.FULL:
        return MLA(cfg, window=None, rngs=rngs)
    if kind is AttentionKind.SLIDING:
        return MLA(cfg, window=cfg.sliding_window, rngs=rngs)
    return V4Attention(cfg, kind, rngs)
