"""mHC: manifold-constrained hyper-connections (DeepSeek-V4 residual streams).

Legend: b batch, t time, d model, s streams (hc_mult), j source stream, k destination stream,
f flattened streams (s * d), m mixing coefficients ((2 + s) * s for a site, s for the head).

The residual is `s` parallel streams [b, t, s, d]. Each block site collapses them into one sub-layer input with
`pre` weights, then `expand` writes the sub-layer output back with `post` weights plus a doubly stochastic `comb`
mix of the old streams. `HyperHead` is the last collapse before the final norm. All coefficient math is float32
(DESIGN section 7): Sinkhorn on low-precision inputs drifts away from doubly stochastic.

Parameter layouts are the transposes of Hugging Face's (`fn` is [f, m] here, [m, f] there) so that the projection
reads like every other kernel in the library (`x @ W`): HF import / export must transpose `fn` / `hc_fn`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.layers.linear import param

# The coefficient projection is tiny (m <= 24 outputs per token) but feeds sigmoid / softmax / Sinkhorn, so it runs
# at full fp32 precision even where the backend's default for fp32 matmuls is a single bf16 pass (TPU).
_EXACT = jax.lax.Precision.HIGHEST


def _stream_sum(term: Callable[[int], jax.Array], n: int) -> jax.Array:
    """term(0) + ... + term(n - 1) over a stream index (n = hc_mult, a handful), unrolled.

    Why not `jnp.sum` / an einsum: every op here touches [b, t, s, s] or [b, t, s, d] and does a few FLOPs per
    element, so its cost is kernel launches and memory passes, not arithmetic. A reduce (or a dot with [b, t] batch
    dimensions) is a kernel of its own, and XLA:CPU hands each one to a library call (~100 us apiece, 20 Sinkhorn
    rounds x 2 sites x 43 layers of them); slices, products and adds fuse with their neighbours into one
    elementwise loop on every backend. Terms are sliced before they are multiplied, so no [..., s, d] product is
    materialised.
    """
    return functools.reduce(operator.add, (term(i) for i in range(n)))


def _axis_sum(x: jax.Array, axis: int) -> jax.Array:
    """`jnp.sum(x, axis, keepdims=True)` over a short stream axis, as `_stream_sum` of slices."""
    return _stream_sum(lambda i: jax.lax.index_in_dim(x, i, axis), x.shape[axis])


def _mix(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """Raw coefficients [b, t, m] from the flattened, weightless-RMS-normed streams (the norm weight lives in fn)."""
    b, t, s, d = streams.shape
    flat = streams.reshape(b, t, s * d).astype(jnp.float32)
    flat = flat * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)
    return jnp.einsum("btf,fm->btm", flat, fn.astype(jnp.float32), precision=_EXACT)


def _collapse(streams: jax.Array, pre: jax.Array) -> jax.Array:
    """sum_s pre_s * X_s over the un-normalised streams, summed in float32, returned in the streams' dtype."""
    x = streams.astype(jnp.float32)
    return _stream_sum(lambda s: pre[..., s, None] * x[..., s, :], x.shape[2]).astype(streams.dtype)


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
    """Push a row-normalised [..., j, k] matrix towards doubly stochastic.

    The caller's softmax already normalised the rows, so the reference starts with a column step and then runs
    `iters - 1` (row, column) rounds: `iters` column steps in all, the last step always a column one. Every
    denominator carries `+ eps`, so the result is only approximately stochastic (rows and columns sum to 1 - O(eps)).
    """
    def column(c):
        return c / (_axis_sum(c, c.ndim - 2) + eps)

    def row(c):
        return c / (_axis_sum(c, c.ndim - 1) + eps)

    # fori_loop, not a Python loop: one traced round instead of 2 * iters unrolled ops per site and layer.
    return jax.lax.fori_loop(0, iters - 1, lambda _, c: column(row(c)), column(comb))


class HyperConnection(nnx.Module):
    """One mHC site (before attention or before the MLP): streams -> (collapsed input, post, comb)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        s, d = cfg.hc_mult, cfg.hidden_size
        m = (2 + s) * s  # [pre (s) | post (s) | comb (s * s, row-major j, k)]
        self.fn = param(rngs, (s * d, m), (None, None), std=cfg.initializer_range)
        self.base = param(rngs, (m,), (None,), std=0)
        self.scale = param(rngs, (3,), (None,), std=None)  # (alpha_pre, alpha_post, alpha_comb)
        self.streams = s
        self.sinkhorn_iters = cfg.hc_sinkhorn_iters
        self.hc_eps = cfg.hc_eps
        self.norm_eps = cfg.rms_norm_eps

    def __call__(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """streams [b, t, s, d] -> collapsed [b, t, d] (streams' dtype), post [b, t, s], comb [b, t, j, k] (fp32)."""
        s = self.streams
        with jax.named_scope("hyper_connection"):
            mix = _mix(streams, self.fn[...], self.norm_eps)
            alpha_pre, alpha_post, alpha_comb = self.scale[...]
            base_pre, base_post, base_comb = jnp.split(self.base[...], [s, 2 * s])
            mix_pre, mix_post, mix_comb = jnp.split(mix, [s, 2 * s], axis=-1)
            pre_logits = mix_pre * alpha_pre + base_pre
            post_logits = mix_post * alpha_post + base_post
            comb_logits = mix_comb * alpha_comb + base_comb
            # `+ eps` keeps every stream's input weight strictly positive; post is in (0, 2) so a stream can both
            # damp and amplify the sub-layer output.
            pre = jax.nn.sigmoid(pre_logits) + self.hc_eps
            post = 2.0 * jax.nn.sigmoid(post_logits)
            comb = jax.nn.softmax(comb_logits.reshape(*comb_logits.shape[:-1], s, s), axis=-1) + self.hc_eps
            with jax.named_scope("sinkhorn"):
                comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
            return _collapse(streams, pre), post, comb


def expand(output: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """New streams [b, t, k, d]: post_k * F(x) + sum_j comb[j, k] * X_j.

    Destination k reads column k of comb (comb^T @ X, not comb @ X): Sinkhorn's matrix is not symmetric, so the
    direction matters. Computed in the streams' dtype, as the reference casts post / comb down before mixing.
    The mix stays an einsum (unlike the sums above): an unrolled `_stream_sum` form is faster forward, but its
    backward, hand-written or autodiffed, made the tiny-v4 bench train step 8% slower on 2 CPU cores.
    """
    dtype = streams.dtype
    with jax.named_scope("hyper_expand"):
        residual = jnp.einsum("btjk,btjd->btkd", comb.astype(dtype), streams, precision=_EXACT)
        return post.astype(dtype)[..., None] * output.astype(dtype)[..., None, :] + residual


class HyperHead(nnx.Module):
    """The final collapse of the streams into one hidden state: sigmoid weights only, no post, no Sinkhorn."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        s, d = cfg.hc_mult, cfg.hidden_size
        self.fn = param(rngs, (s * d, s), (None, None), std=cfg.initializer_range)
        self.base = param(rngs, (s,), (None,), std=0)
        self.scale = param(rngs, (1,), (None,), std=None)
        self.hc_eps = cfg.hc_eps
        self.norm_eps = cfg.rms_norm_eps

    def __call__(self, streams: jax.Array) -> jax.Array:
        """streams [b, t, s, d] -> [b, t, d] in the streams' dtype."""
        with jax.named_scope("hyper_head"):
            mix = _mix(streams, self.fn[...], self.norm_eps)
            pre = jax.nn.sigmoid(mix * self.scale[...] + self.base[...]) + self.hc_eps
            return _collapse(streams, pre)
