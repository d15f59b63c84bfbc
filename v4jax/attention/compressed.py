"""DeepSeek-V4 attention: window-only (`W`), compressed sparse (`C`, CSA) and heavily compressed (`H`, HCA).

Legend: b batch, t time, d model, n heads, c head dim (the shared K=V entry), q q-LoRA rank, w compressed entries,
m compression ratio, g output groups, r output LoRA rank, p rope dims.
Every kind is shared-KV multi-query attention: one c-wide entry per token serves as key and value for all heads,
with RoPE on its last p dims. A window branch sees the last `sliding_window` tokens; `H` adds every visible entry
of a ratio-128 compressor, `C` adds the indexer's top-k of a ratio-4 overlapping compressor. A learned per-head
sink logit takes part in the softmax (so heads may attend to nothing), the output's rope dims are rotated back by
the query position, and a grouped low-rank projection maps heads to the model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import kernels
from v4jax.attention.indexer import Indexer
from v4jax.config import AttentionImpl, AttentionKind, ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import param, read
from v4jax.layers.norm import RMSNorm
from v4jax.sharding import Axis, constrain


class Compressor(nnx.Module):
    """Gated pooling of each block of m tokens into one entry: a softmax over the block's tokens, per channel.

    Overlapping (CSA): projections are 2x wide; entry i pools block i's second half with block i-1's first half
    (2m slots). Computed in float32 as the reference does. Entry i gets RoPE at position i*m (its block's start).
    """

    def __init__(self, dim: int, width: int, ratio: int, *, overlap: bool, eps: float, std: float, rngs: nnx.Rngs):
        parts = 2 if overlap else 1
        self.width, self.ratio, self.overlap = width, ratio, overlap
        self.wkv = param(rngs, (dim, parts * width), (Axis.EMBED, Axis.HEAD_DIM), std=std)
        self.wgate = param(rngs, (dim, parts * width), (Axis.EMBED, Axis.HEAD_DIM), std=std)
        self.position_bias = param(rngs, (ratio, parts * width), (None, Axis.HEAD_DIM), std=0)
        self.norm = RMSNorm(width, Axis.HEAD_DIM, eps=eps, rngs=rngs)

    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] -> entries float32 [b, w, c] (w = t // m, not yet rotated) and each entry's segment [b, w]
        (INVALID_SEGMENT where its block spans two packed documents: such an entry is never visible)."""
        b, t, _ = x.shape
        m, c = self.ratio, self.width
        w = t // m
        x32 = x[:, :w * m].astype(jnp.float32)
        kv = jnp.einsum("btd,dc->btc", x32, self.wkv[...].astype(jnp.float32)).reshape(b, w, m, -1)
        gate = jnp.einsum("btd,dc->btc", x32, self.wgate[...].astype(jnp.float32)).reshape(b, w, m, -1)
        gate = gate + self.position_bias[...].astype(jnp.float32)
        blocks = segment_ids[:, :w * m].reshape(b, w, m)
        entry_segment = jnp.where(jnp.all(blocks == blocks[..., -1:], axis=-1), blocks[..., -1],
                                  kernels.INVALID_SEGMENT)
        if self.overlap:
            kv, gate = _with_previous_block(kv, gate, c, entry_segment)
        pooled = jnp.sum(kv * jax.nn.softmax(gate, axis=2), axis=2)
        return self.norm(pooled), entry_segment


def _with_previous_block(kv, gate, c, entry_segment):
    """[b, w, m, 2c] -> [b, w, 2m, c]: block i-1's first half stacked before block i's second half. The previous
    slots of entry 0 (and of an entry whose previous block is another document) get gate -inf: weight 0."""
    b, w, m, _ = kv.shape
    previous_kv = jnp.pad(kv[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    previous_gate = jnp.pad(gate[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    previous_segment = jnp.pad(entry_segment[:, :-1], ((0, 0), (1, 0)), constant_values=kernels.INVALID_SEGMENT)
    usable = ((previous_segment == entry_segment) & (entry_segment != kernels.INVALID_SEGMENT))[:, :, None, None]
    previous_gate = jnp.where(usable, previous_gate, -jnp.inf)
    return (jnp.concatenate([previous_kv, kv[..., c:]], axis=2),
            jnp.concatenate([previous_gate, gate[..., c:]], axis=2))


class V4Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: AttentionKind, rngs: nnx.Rngs):
        d, n, c, std, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.initializer_range, \
            cfg.rms_norm_eps
        g, r = cfg.o_groups, cfg.o_lora_rank
        self.cfg, self.kind, self.ratio = cfg, kind, cfg.compress_ratio(kind)
        self.wq_a = param(rngs, (d, cfg.q_lora_rank), (Axis.EMBED, Axis.Q_LORA), std=std)
        self.q_norm = RMSNorm(cfg.q_lora_rank, Axis.Q_LORA, eps=eps, rngs=rngs)
        self.wq_b = param(rngs, (cfg.q_lora_rank, n, c), (Axis.Q_LORA, Axis.HEADS, Axis.HEAD_DIM), std=std)
        self.wkv = param(rngs, (d, c), (Axis.EMBED, Axis.HEAD_DIM), std=std)
        self.kv_norm = RMSNorm(c, Axis.HEAD_DIM, eps=eps, rngs=rngs)
        self.wo_a = param(rngs, (g, n // g, c, r), (None, Axis.HEADS, Axis.HEAD_DIM, None), std=std)
        self.wo_b = param(rngs, (g, r, d), (None, None, Axis.EMBED), std=std)
        self.sinks = param(rngs, (n,), (Axis.HEADS,), std=0)
        self.compressor = (Compressor(d, c, self.ratio, overlap=kind is AttentionKind.CSA, eps=eps, std=std,
                                      rngs=rngs) if self.ratio else None)
        self.indexer = Indexer(cfg, rngs) if kind is AttentionKind.CSA else None

    def rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Window-only layers: rope_theta, no YaRN. Compressed layers: compress_rope_theta with YaRN, for every
        rotation in the layer (queries, keys, compressed entries, indexer, output)."""
        cfg = self.cfg
        if self.kind is AttentionKind.WINDOW:
            return rope.cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, None)
        return rope.cos_sin(positions, cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, x.dtype
        cos, sin = self.rope_tables(positions)
        with jax.named_scope("v4_projections"):
            q_latent = self.q_norm(jnp.einsum("btd,dq->btq", x, read(self.wq_a, dtype)))
            q = jnp.einsum("btq,qnc->btnc", q_latent, read(self.wq_b, dtype))
            q = rope.rotate_tail(unweighted_rms(q, cfg.rms_norm_eps), cos, sin)
            kv = self.kv_norm(jnp.einsum("btd,dc->btc", x, read(self.wkv, dtype)))
            kv = rope.rotate_tail(kv, cos, sin)
            q = constrain(q, (Axis.BATCH, Axis.SEQ, Axis.HEADS, Axis.HEAD_DIM))
        compressed = self.compressed(x, q_latent, positions, segment_ids) if self.compressor else None
        with jax.named_scope("v4_kernel"):
            kernel = kernels.v4_reference if cfg.attention_impl is AttentionImpl.REFERENCE else kernels.v4_blockwise
            out = kernel(q, kv, segment_ids, self.sinks[...].astype(jnp.float32), cfg.head_dim ** -0.5,
                         cfg.sliding_window, cfg.attention_block_size, compressed)
        with jax.named_scope("v4_output"):
            out = rope.rotate_tail(out, cos, -sin)  # values carry absolute RoPE; make each contribution relative
            grouped = out.reshape(*out.shape[:2], cfg.o_groups, -1, cfg.head_dim)
            low_rank = jnp.einsum("btgmc,gmcr->btgr", grouped, read(self.wo_a, dtype))
            return jnp.einsum("btgr,grd->btd", low_rank, read(self.wo_b, dtype))

    def compressed(self, x, q_latent, positions, segment_ids) -> kernels.Compressed:
        with jax.named_scope("v4_compressor"):
            entries, entry_segment = self.compressor(x, segment_ids)
            entry_positions = jnp.arange(entries.shape[1], dtype=jnp.int32) * self.ratio
            cos, sin = self.rope_tables(jnp.broadcast_to(entry_positions, entries.shape[:2]))
            entries = rope.rotate_tail(entries, cos, sin).astype(x.dtype)
        selection = None
        if self.indexer is not None:
            with jax.named_scope("v4_indexer"):
                selection = self.indexer(x, q_latent, positions, segment_ids, self.rope_tables)
        return kernels.Compressed(entries, entry_segment, self.ratio, selection)


def unweighted_rms(x: jax.Array, eps: float) -> jax.Array:
    """Per-head RMS normalisation without a weight (V4's query norm)."""
    x32 = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps).astype(x.dtype)
