"""Sharding: logical axis names, rules presets, the five-axis mesh, and the one activation pin `constrain`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding

from v4jax.sharding.axes import Axis
from v4jax.sharding.mesh import MESH_AXES, MeshAxis, make_mesh
from v4jax.sharding.rules import PRESETS, Preset, get_rules, logical_to_spec, use_rules

__all__ = ["Axis", "MESH_AXES", "MeshAxis", "PRESETS", "Preset", "constrain", "get_rules", "logical_to_spec",
           "make_mesh", "state_shardings", "use_rules", "variable_axes"]


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axis names under the current mesh and rules (no-op without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical, mesh_shape=dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes a parameter was declared with (`layers` included once a unit is stacked)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"variable of shape {variable.shape} declares no logical axes")
    return tuple(axes)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=None):
    """NamedShardings for every Variable of an (abstract) nnx.State, resolved strictly from its logical axes."""
    rules = get_rules(rules)
    mesh_shape = dict(mesh.shape)

    def one(variable):
        return variable.replace(NamedSharding(mesh, logical_to_spec(variable_axes(variable), rules, strict=True,
                                                                    mesh_shape=mesh_shape)))

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
