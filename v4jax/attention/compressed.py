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
from v4jax.attention.compressor import Compressor, block_start_positions
from v4jax.attention.indexer import Indexer
from v4jax.config import AttentionImpl, AttentionKind, ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import param, read
from v4jax.layers.norm import RMSNorm
from v4jax.sharding import Axis, constrain


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
        cos, sin = self.rope_tables(positions)
        q_latent, q, kv = self.project(x, cos, sin)
        # Shorter than one block: no entry exists yet, the layer is its window branch alone.
        has_entries = self.compressor is not None and x.shape[1] >= self.ratio
        compressed = self.compressed(x, q_latent, positions, segment_ids) if has_entries else None
        return self.output(self.attend(q, kv, segment_ids, compressed), cos, sin)

    def attend(self, q, kv, segment_ids, compressed: kernels.Compressed | None, **index) -> jax.Array:
        """The kernel of the config's implementation; `index` passes a context shard's global indices and key
        segments (`kernels`)."""
        cfg = self.cfg
        with jax.named_scope("v4_kernel"):
            kernel = kernels.v4_reference if cfg.attention_impl is AttentionImpl.REFERENCE else kernels.v4_blockwise
            return kernel(q, kv, segment_ids, self.sinks[...].astype(jnp.float32), self.scale, cfg.sliding_window,
                          cfg.attention_block_size, compressed, **index)

    @property
    def scale(self) -> float:
        return self.cfg.head_dim ** -0.5

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [b, t, d] -> the normed query latent [b, t, q], rotated queries [b, t, n, c] and entries [b, t, c]."""
        cfg, dtype = self.cfg, x.dtype
        with jax.named_scope("v4_projections"):
            q_latent = self.q_norm(jnp.einsum("btd,dq->btq", x, read(self.wq_a, dtype)))
            q = jnp.einsum("btq,qnc->btnc", q_latent, read(self.wq_b, dtype))
            q = rope.rotate_tail(unweighted_rms(q, cfg.rms_norm_eps), cos, sin)
            kv = self.kv_norm(jnp.einsum("btd,dc->btc", x, read(self.wkv, dtype)))
            kv = rope.rotate_tail(kv, cos, sin)
            return q_latent, constrain(q, (Axis.BATCH, Axis.SEQ, Axis.HEADS, Axis.HEAD_DIM)), kv

    def output(self, out: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Attention output [b, t, n, c] -> [b, t, d]."""
        cfg, dtype = self.cfg, out.dtype
        with jax.named_scope("v4_output"):
            out = rope.rotate_tail(out, cos, -sin)  # values carry absolute RoPE; make each contribution relative
            grouped = out.reshape(*out.shape[:2], cfg.o_groups, -1, cfg.head_dim)
            low_rank = jnp.einsum("btgmc,gmcr->btgr", grouped, read(self.wo_a, dtype))
            return jnp.einsum("btgr,grd->btd", low_rank, read(self.wo_b, dtype))

    def compressed(self, x, q_latent, positions, segment_ids) -> kernels.Compressed:
        entries, entry_segment = self.entries(x, positions, segment_ids)
        selection = None
        if self.indexer is not None:
            selection = self.indexer.select(x, q_latent, positions, self.rope_tables,
                                            self.index_keys(x, positions, segment_ids))
        return kernels.Compressed(entries, entry_segment, self.ratio, selection)

    def entries(self, x, positions, segment_ids, previous=None) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] -> rotated entries [b, t // m, c] in x's dtype and their segments; `previous` is the block
        before x (`Compressor`)."""
        with jax.named_scope("v4_compressor"):
            entries, entry_segment = self.compressor(x, segment_ids, previous)
            cos, sin = self.rope_tables(block_start_positions(positions, self.ratio, entries.shape[1]))
            return rope.rotate_tail(entries, cos, sin).astype(x.dtype), entry_segment

    def index_keys(self, x, positions, segment_ids, previous=None) -> jax.Array:
        """CSA: the lightning indexer's rotated compressed keys float32 [b, t // m, i]."""
        with jax.named_scope("v4_indexer"):
            return self.indexer.keys(x, positions, segment_ids, self.rope_tables, previous)


def unweighted_rms(x: jax.Array, eps: float) -> jax.Array:
    """Per-head RMS normalisation without a weight (V4's query norm)."""
    x32 = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps).astype(x.dtype)
