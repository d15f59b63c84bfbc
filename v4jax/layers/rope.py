"""Rotary position embedding with DeepSeek's interleaved pairs and YaRN context extension.

DeepSeek rotates pairs (x0, x1), (x2, x3), ... each by one frequency and writes the result as
[evens rotated | odds rotated]; queries and keys get the same permutation, so scores are unchanged and the rope
block of a query/key is simply in that half layout from here on.
YaRN: frequencies below the correction range are interpolated by `factor`, those above kept, a linear ramp between;
cos/sin carry `attention_factor` and the softmax scale gains mscale(factor, mscale_all_dim)^2 (see `softmax_scale`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_correction_range(scaling: RopeScaling, dim: int, base: float) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = math.floor(correction_dim(scaling.beta_fast)), math.ceil(correction_dim(scaling.beta_slow))
    return max(low, 0), min(high, dim - 1)


def frequencies(dim: int, base: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (float32, computed as the reference does) and the cos/sin attention factor."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    if scaling is None:
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)
    low, high = _yarn_correction_range(scaling, dim, base)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor,
                                                                                     scaling.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(scaling.factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(head_dim: int, scaling: RopeScaling | None) -> float:
    """1/sqrt(head_dim), times mscale^2 under YaRN (DeepSeek's long-context temperature)."""
    scale = head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def cos_sin(positions: jax.Array, dim: int, base: float, scaling: RopeScaling | None) -> tuple[jax.Array, jax.Array]:
    """positions int [b, t] -> cos, sin float32 [b, t, dim/2]."""
    inv_freq, attention_factor = frequencies(dim, base, scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [b, t, (n,) dim] interleaved -> rotated, half layout. cos/sin [b, t, dim/2] broadcast over heads."""
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)


def rotate_tail(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """V4 RoPE: rotate the last 2 * cos.shape[-1] dims of x [b, t, (n,) c] in interleaved pairs and keep the
    interleaved layout (values carry these dims, so the layout must survive). `-sin` rotates back."""
    p = 2 * cos.shape[-1]
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    tail = x[..., -p:].astype(jnp.float32)
    even, odd = tail[..., 0::2], tail[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(tail.shape)
    return jnp.concatenate([x[..., :-p], rotated.astype(x.dtype)], axis=-1)
