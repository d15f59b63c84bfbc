"""Parameters with logical axes, the token embedding and the output head.

Legend: b batch, t time, d model, v vocab.
Every parameter is an `nnx.Variable` whose `logical_axes` metadata names its dimensions (`sharding/axes.py`).
It is our own key, not Flax's `out_sharding`, so Flax never tries to place a variable by itself; placement happens
once, in `model.init`'s jit with out_shardings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.sharding import Axis


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float | None = 0.02,
          dtype=jnp.float32, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A variable declared with its logical axes. std=None gives ones (norm weights)."""
    if len(shape) != len(axes):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} logical axes, got {tuple(axes)}")
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    # `init_std` lets `model.init` redraw every parameter from one random stream (see `fill_random`).
    return kind(value, logical_axes=tuple(axes), init_std=std)


def fill_random(state, key: jax.Array, one_draw_limit: int = 1 << 27):
    """New values for an (abstract) state: ones / zeros / normal(0, init_std) as each `param` declared.

    A variable whose metadata holds an `init_fn` (non-trainable state that zeros would make invalid, such as the
    hash router's token -> experts table) gets `init_fn(key, shape, dtype)` instead, with its own folded key. The
    `init_fn` must compare by value (a frozen dataclass, not a closure): metadata is part of the pytree structure.

    Small models take all normal draws from one flat, replicated `jax.random.normal` sliced per parameter: XLA:CPU
    then compiles one threefry kernel instead of one per parameter (2 s instead of 15-20 s for a tiny model).
    Past `one_draw_limit` values each parameter draws its own, so it is generated directly in its sharding and
    no device ever holds the whole model.
    """
    variables, treedef = jax.tree.flatten(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    stds = [v.get_metadata()["init_std"] for v in variables]
    init_fns = [v.get_metadata().get("init_fn") for v in variables]
    sizes = [v.size if std and fn is None else 0 for v, std, fn in zip(variables, stds, init_fns)]
    one_draw = sum(sizes) <= one_draw_limit
    if one_draw:
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
        if not jax.sharding.get_abstract_mesh().empty:
            flat = jax.lax.with_sharding_constraint(flat, jax.sharding.PartitionSpec())
    offsets = [0, *itertools.accumulate(sizes)]
    values = []
    for i, (variable, std) in enumerate(zip(variables, stds)):
        if init_fns[i] is not None:
            value = init_fns[i](jax.random.fold_in(key, i), variable.shape, variable.dtype)
        elif std is None:
            value = jnp.ones(variable.shape, variable.dtype)
        elif std == 0:
            value = jnp.zeros(variable.shape, variable.dtype)
        elif one_draw:
            value = std * flat[offsets[i]:offsets[i + 1]].reshape(variable.shape)
        else:
            value = std * jax.random.normal(jax.random.fold_in(key, i), variable.shape, jnp.float32)
        values.append(variable.replace(value.astype(variable.dtype)))
    return jax.tree.unflatten(treedef, values)


def read(variable: nnx.Variable, dtype) -> jax.Array:
    """A parameter in the compute dtype."""
    return variable[...].astype(dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), (Axis.VOCAB, Axis.EMBED), std=std)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(read(self.embedding, dtype), tokens, axis=0)


class Head(nnx.Module):
    """The output projection to vocabulary logits, always returned in float32."""

    def __init__(self, dim: int, vocab: int, *, std: float, rngs: nnx.Rngs):
        self.kernel = param(rngs, (dim, vocab), (Axis.EMBED, Axis.VOCAB), std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,dv->btv", x, read(self.kernel, x.dtype), preferred_element_type=jnp.float32)
