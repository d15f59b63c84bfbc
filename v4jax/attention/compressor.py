"""The V4 compressor: gated pooling of each block of m tokens into one cache entry (CSA, HCA and the indexer).

Legend: b batch, t time, d model, c entry width, w entries (blocks), m compression ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import kernels
from v4jax.layers.linear import param
from v4jax.layers.norm import RMSNorm
from v4jax.sharding import Axis


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

    def __call__(self, x: jax.Array, segment_ids: jax.Array, previous: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] -> entries float32 [b, w, c] (w = t // m, not yet rotated) and each entry's segment [b, w]
        (INVALID_SEGMENT where its block spans two packed documents: such an entry is never visible).

        `previous` (x [b, m, d], segments [b, m]) is the block before x, for a context shard whose first block
        overlaps its left neighbour's last (CSA); its own entry is computed and dropped."""
        if previous is not None:
            if not self.overlap:
                raise ValueError("only an overlapping compressor reads the previous block")
            entries, entry_segment = self(jnp.concatenate([previous[0], x], 1),
                                          jnp.concatenate([previous[1], segment_ids], 1))
            return entries[:, 1:], entry_segment[:, 1:]
        b, t, _ = x.shape
        m = self.ratio
        w = t // m
        kv, gate = self.projections(x[:, :w * m], jnp.arange(w * m) % m)
        blocks = segment_ids[:, :w * m].reshape(b, w, m)
        entry_segment = jnp.where(jnp.all(blocks == blocks[..., -1:], axis=-1), blocks[..., -1],
                                  kernels.INVALID_SEGMENT)
        return self.pool(kv.reshape(b, w, m, -1), gate.reshape(b, w, m, -1), entry_segment), entry_segment

    def projections(self, x: jax.Array, slot: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [b, t, d] and each token's slot in its block (t mod m) -> kv, gate float32 [b, t, parts * c]."""
        x32 = x.astype(jnp.float32)
        kv = jnp.einsum("btd,dc->btc", x32, self.wkv[...].astype(jnp.float32))
        gate = jnp.einsum("btd,dc->btc", x32, self.wgate[...].astype(jnp.float32))
        return kv, gate + self.position_bias[...].astype(jnp.float32)[slot]

    def pool(self, kv: jax.Array, gate: jax.Array, block_segment: jax.Array) -> jax.Array:
        """Blocks kv, gate [b, w, m, parts * c] -> normed entries [b, w, c]. With overlap, block i also pools block
        i-1's first half when both carry the same (valid) segment."""
        if self.overlap:
            kv, gate = _with_previous_block(kv, gate, self.width, block_segment)
        return self.norm(jnp.sum(kv * jax.nn.softmax(gate, axis=2), axis=2))


def _with_previous_block(kv, gate, c, entry_segment):
    """[b, w, m, 2c] -> [b, w, 2m, c]: block i-1's first half stacked before block i's second half. The previous
    slots of entry 0 (and of an entry whose previous block is another document) get gate -inf: weight 0."""
    previous_kv = jnp.pad(kv[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    previous_gate = jnp.pad(gate[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    previous_segment = jnp.pad(entry_segment[:, :-1], ((0, 0), (1, 0)), constant_values=kernels.INVALID_SEGMENT)
    usable = ((previous_segment == entry_segment) & (entry_segment != kernels.INVALID_SEGMENT))[:, :, None, None]
    previous_gate = jnp.where(usable, previous_gate, -jnp.inf)
    return (jnp.concatenate([previous_kv, kv[..., c:]], axis=2),
            jnp.concatenate([previous_gate, gate[..., c:]], axis=2))


def block_start_positions(positions: jax.Array, ratio: int, entries: int) -> jax.Array:
    """An entry is rotated at its block's first position (i * m unpacked; restarting per packed document)."""
    return positions[:, :entries * ratio:ratio]
