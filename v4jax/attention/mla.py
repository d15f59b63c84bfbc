"""Multi-head Latent Attention (DeepSeek-V2/V3), full (`M`) or sliding-window (`S`).

Legend: b batch, t time, d model, n heads, h qk head dim, p rope dim, v value dim, q q-LoRA rank, r kv latent rank.
Queries: x -> q LoRA -> norm -> per-head [nope | rope]. Keys/values: x -> latent c (r) + one shared rope key (p);
the latent is normed and up-projected to per-head [k_nope | v]. The shared rope key is broadcast over heads.
The latent plus rope key is what a cache stores (serving); training expands per head and runs a kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import kernels
from v4jax.config import AttentionImpl, ModelConfig
from v4jax.layers import rope
from v4jax.layers.linear import param, read
from v4jax.layers.norm import RMSNorm
from v4jax.sharding import Axis, constrain

# DeepSeek's latent norms use the RMSNorm default, not `rms_norm_eps` (both reference implementations agree).
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, window: int | None, rngs: nnx.Rngs):
        d, n, std = cfg.hidden_size, cfg.num_attention_heads, cfg.initializer_range
        self.cfg, self.window = cfg, window
        if cfg.q_lora_rank:
            self.wq_a = param(rngs, (d, cfg.q_lora_rank), (Axis.EMBED, Axis.Q_LORA), std=std)
            self.q_norm = RMSNorm(cfg.q_lora_rank, Axis.Q_LORA, eps=LATENT_NORM_EPS, rngs=rngs)
            self.wq_b = param(rngs, (cfg.q_lora_rank, n, cfg.qk_head_dim), (Axis.Q_LORA, Axis.HEADS, Axis.HEAD_DIM),
                              std=std)
        else:
            self.wq = param(rngs, (d, n, cfg.qk_head_dim), (Axis.EMBED, Axis.HEADS, Axis.HEAD_DIM), std=std)
        self.wkv_a = param(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), (Axis.EMBED, Axis.KV_LORA), std=std)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, Axis.KV_LORA, eps=LATENT_NORM_EPS, rngs=rngs)
        self.wkv_b = param(rngs, (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim),
                           (Axis.KV_LORA, Axis.HEADS, Axis.HEAD_DIM), std=std)
        self.wo = param(rngs, (n, cfg.v_head_dim, d), (Axis.HEADS, Axis.HEAD_DIM, Axis.EMBED), std=std)

    def queries(self, x: jax.Array) -> jax.Array:
        """x [b, t, d] -> q [b, t, n, h] (rope part not yet rotated)."""
        dtype = x.dtype
        if self.cfg.q_lora_rank:
            q_latent = self.q_norm(jnp.einsum("btd,dq->btq", x, read(self.wq_a, dtype)))
            return jnp.einsum("btq,qnh->btnh", q_latent, read(self.wq_b, dtype))
        return jnp.einsum("btd,dnh->btnh", x, read(self.wq, dtype))

    def latents(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] -> normed latent c [b, t, r] and the shared rope key [b, t, p] (not yet rotated)."""
        kv = jnp.einsum("btd,dr->btr", x, read(self.wkv_a, x.dtype))
        latent, k_rope = jnp.split(kv, [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_norm(latent), k_rope

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [b, t, d] -> queries [b, t, n, h] (rope part rotated), latent [b, t, r], rotated rope key [b, t, p]."""
        cfg, nope = self.cfg, self.cfg.qk_nope_head_dim
        q = self.queries(x)
        latent, k_rope = self.latents(x)
        cos, sin = rope.cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = jnp.concatenate([q[..., :nope], rope.apply(q[..., nope:], cos, sin)], axis=-1)
        return q, latent, rope.apply(k_rope, cos, sin)

    @property
    def scale(self) -> float:
        return rope.softmax_scale(self.cfg.qk_head_dim, self.cfg.rope_scaling)

    def keys_values(self, latent: jax.Array, k_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latent [b, s, r] and rotated rope key [b, s, p] -> per-head keys [b, s, n, h] and values [b, s, n, v]."""
        kv = jnp.einsum("bsr,rnh->bsnh", latent, read(self.wkv_b, latent.dtype))
        k_nope, v = jnp.split(kv, [self.cfg.qk_nope_head_dim], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))],
                            axis=-1)
        return k, v

    def attend(self, q, k, v, segment_ids, **index) -> jax.Array:
        """The kernel of this layer's kind and the config's implementation; `index` passes a context shard's
        global indices and key segments (`kernels`)."""
        cfg = self.cfg
        q, k, v = (constrain(a, (Axis.BATCH, Axis.SEQ, Axis.HEADS, Axis.HEAD_DIM)) for a in (q, k, v))
        with jax.named_scope("mla_kernel"):
            if cfg.attention_impl is AttentionImpl.REFERENCE:
                return kernels.reference(q, k, v, segment_ids, self.scale, self.window, **index)
            if self.window is None:
                return kernels.blockwise(q, k, v, segment_ids, self.scale, cfg.attention_block_size, **index)
            return kernels.banded(q, k, v, segment_ids, self.scale, self.window, cfg.attention_block_size, **index)

    def output(self, out: jax.Array) -> jax.Array:
        with jax.named_scope("mla_output"):
            return jnp.einsum("btnv,nvd->btd", out, read(self.wo, out.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        with jax.named_scope("mla_projections"):
            q, latent, k_rope = self.project(x, positions)
            k, v = self.keys_values(latent, k_rope)
        return self.output(self.attend(q, k, v, segment_ids))
