"""The lightning indexer of CSA layers: which compressed entries each query attends to.

Legend: b batch, t time, d model, q q-LoRA rank, h indexer heads, i indexer head dim, w compressed entries.
It runs its own (narrow, overlapping) compressor over the same blocks as the layer's main compressor, and scores
query t against entry s as sum_h w[t, h] * relu(q[t, h] . k[s]). The top-k per query is taken inside the
attention kernel, one query block at a time (`kernels.Selection`), so nothing O(t x w) is ever materialised
beyond one block. Scoring runs in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from v4jax.attention.compressor import Compressor, block_start_positions
from v4jax.attention.kernels import Selection
from v4jax.config import ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import param
from v4jax.sharding import Axis


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, i, std = cfg.index_n_heads, cfg.index_head_dim, cfg.initializer_range
        self.cfg = cfg
        self.compressor = Compressor(cfg.hidden_size, i, cfg.csa_compress_ratio, overlap=True,
                                     eps=cfg.rms_norm_eps, std=std, rngs=rngs)
        self.wq_b = param(rngs, (cfg.q_lora_rank, h, i), (Axis.Q_LORA, Axis.HEADS, Axis.HEAD_DIM), std=std)
        self.weights_proj = param(rngs, (cfg.hidden_size, h), (Axis.EMBED, Axis.HEADS), std=std)

    def keys(self, x, positions, segment_ids, rope_tables, previous=None):
        """x [b, t, d] -> the rotated compressed keys float32 [b, t // m, i]; `previous` as in `Compressor`."""
        keys, _ = self.compressor(x, segment_ids, previous)
        return rope.rotate_tail(keys, *rope_tables(block_start_positions(positions, self.cfg.csa_compress_ratio,
                                                                         keys.shape[1])))

    def select(self, x, q_latent, positions, rope_tables, keys) -> Selection:
        """The queries and head weights of tokens x [b, t, d] against (rotated) compressed keys [b, w, i]; serving
        passes its cached keys."""
        cfg = self.cfg
        queries = jnp.einsum("btq,qhi->bthi", q_latent.astype(jnp.float32), self.wq_b[...].astype(jnp.float32))
        queries = rope.rotate_tail(queries, *rope_tables(positions))
        weights = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), self.weights_proj[...].astype(jnp.float32))
        return Selection(queries=queries, weights=weights * cfg.index_n_heads ** -0.5, keys=keys,
                         topk=cfg.index_topk, scale=cfg.index_head_dim ** -0.5)
