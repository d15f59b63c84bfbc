"""The serving cache: static-shaped per-layer attention caches for `batch` rows of up to `max_len` tokens.

The tree follows the model's layout (`model.layout`): one cache per unrolled prefix / suffix layer and, for the
scanned unit, one per position in the unit with every array stacked over the unit's repeats (so `lax.scan` runs
caches and parameters together). What each kind stores is in `attention/cached.py`; `cost.kv_cache_bytes(...,
include_state=True)` in the cache dtype's format predicts the floating-point bytes exactly (`cache_bytes`).
`lengths[b]` is how many tokens row b holds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding

from v4jax import model
from v4jax.attention.cached import LayerCache, cache_axes, cache_shapes
from v4jax.config import ModelConfig
from v4jax.sharding import Axis, Preset, get_rules, logical_to_spec


@struct.dataclass
class Cache:
    prefix: tuple[LayerCache, ...]
    unit: tuple[LayerCache, ...]  # arrays [repeats, batch, ...]
    suffix: tuple[LayerCache, ...]
    lengths: jax.Array  # int32 [batch]
    max_len: int = struct.field(pytree_node=False)  # tokens a row can hold

    @property
    def layers(self) -> tuple:
        return self.prefix, self.unit, self.suffix


def cache_spec(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """The cache as jax.ShapeDtypeStruct leaves (allocates nothing). dtype defaults to the compute dtype."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    dtype = jnp.dtype(dtype or cfg.dtype)
    specs, lay = cfg.layers, model.layout(cfg)

    def layer(i: int) -> LayerCache:
        return cache_shapes(cfg, specs[i].attention, batch, max_len, dtype)

    def stacked(shapes: LayerCache) -> LayerCache:
        return {k: jax.ShapeDtypeStruct((lay.repeats, *v.shape), v.dtype) for k, v in shapes.items()}

    unit_start = lay.prefix
    return Cache(
        prefix=tuple(layer(i) for i in range(lay.prefix)),
        unit=tuple(stacked(layer(unit_start + j)) for j in range(lay.unit)) if lay.repeats else (),
        suffix=tuple(layer(i) for i in range(cfg.num_hidden_layers - lay.suffix, cfg.num_hidden_layers)),
        lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
        max_len=max_len,
    )


def _logical_axes(cache: Cache) -> Cache:
    """Logical axes per leaf (`attention.cached.cache_axes`), the unit's behind their `layers` axis."""
    def layer(caches: tuple[LayerCache, ...], stacked: bool):
        lead = (Axis.LAYERS,) if stacked else ()
        return tuple({name: lead + cache_axes(name, a.ndim - stacked) for name, a in c.items()} for c in caches)

    return Cache(prefix=layer(cache.prefix, False), unit=layer(cache.unit, True), suffix=layer(cache.suffix, False),
                 lengths=(Axis.BATCH,), max_len=cache.max_len)


def cache_shardings(spec: Cache, mesh, rules=Preset.SERVE) -> Cache:
    """NamedShardings for a cache on `mesh` (concrete or abstract): rows over the rules' batch axes and, for the
    arrays that grow with max_len, positions over `cache_seq`'s (`context` under `serve`); a dimension that does
    not divide over its mesh axes (e.g. a one-row prefill cache's batch) stays whole; everything else replicated."""
    rules, shape = get_rules(rules), dict(mesh.shape)

    def sharding(axes, leaf):
        spec = logical_to_spec(axes, rules, mesh_shape=shape)
        for dim, names in enumerate(spec):
            names = (names,) if isinstance(names, str) else names or ()
            if leaf.shape[dim] % math.prod(shape[n] for n in names):
                axes = axes[:dim] + (None,) + axes[dim + 1:]
        return NamedSharding(mesh, logical_to_spec(axes, rules, mesh_shape=shape))

    return jax.tree.map(sharding, _logical_axes(spec), spec, is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and len(x) > 0 and all(a is None or isinstance(a, str) for a in x)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh | None = None, dtype=None,
               rules=Preset.SERVE) -> Cache:
    """An empty cache (zeros, lengths 0), created in its shardings when a mesh is given."""
    rules_key = rules if isinstance(rules, str) else tuple(sorted(get_rules(rules).items()))
    return _zeros_fn(cfg, batch, max_len, mesh, None if dtype is None else jnp.dtype(dtype).name, rules_key)()


@functools.lru_cache(maxsize=64)
def _zeros_fn(cfg, batch, max_len, mesh, dtype, rules_key):
    """One compiled initialiser per cache shape and placement (a new jit per call would compile every time)."""
    spec = cache_spec(cfg, batch, max_len, dtype)
    rules = rules_key if isinstance(rules_key, str) else dict(rules_key)
    shardings = None if mesh is None else cache_shardings(spec, mesh, rules)
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec), out_shardings=shardings)


def cache_bytes(cache: Cache) -> int:
    """Bytes of the attention caches (floating-point arrays; the int32 `lengths` bookkeeping left out)."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache.layers))


@functools.partial(jax.jit, donate_argnums=0)
def insert(cache: Cache, slot, one: Cache) -> Cache:
    """Row `slot` of `cache` replaced by the batch-1 cache `one` (a prefilled request joining a decode batch)."""
    def put(axis):
        return lambda full, row: jax.lax.dynamic_update_slice_in_dim(full, row.astype(full.dtype), slot, axis)

    return cache.replace(prefix=jax.tree.map(put(0), cache.prefix, one.prefix),
                         unit=jax.tree.map(put(1), cache.unit, one.unit),
                         suffix=jax.tree.map(put(0), cache.suffix, one.suffix),
                         lengths=put(0)(cache.lengths, one.lengths))
