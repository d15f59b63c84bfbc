"""Sharding: logical axis names, rules presets, the five-axis mesh, and the one activation pin `constrain`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.sharding.axes import Axis
from v4jax.sharding.mesh import MESH_AXES, MeshAxis, make_mesh
from v4jax.sharding.rules import PRESETS, Preset, get_rules, logical_to_spec, use_rules

__all__ = ["Axis", "MESH_AXES", "MeshAxis", "PRESETS", "Preset", "constrain", "dividing_axes", "fsdp_fallback", "get_rules",
           "logical_to_spec", "make_mesh", "mesh_axes", "mesh_rules", "state_shardings", "use_rules", "variable_axes"]


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical axis names under the current mesh and rules (no-op without a mesh).
    A dimension keeps only the leading mesh axes whose product divides it (a batch of 4 on data=2, expert=4 is
    split over data alone): XLA would otherwise pad it and replicate around the pin."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    shape, manual = dict(mesh.shape), set(mesh.manual_axes)  # inside a shard_map the manual axes are not ours
    spec = logical_to_spec(logical, mesh_shape=shape)
    entries = (dividing_axes(tuple(a for a in mesh_axes(entry) if a not in manual), size, shape)
               for entry, size in zip(spec, x.shape))
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in entries))))


def mesh_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def dividing_axes(axes: Sequence[str], size: int, mesh_shape) -> tuple[str, ...]:
    """The longest prefix of `axes` whose product of mesh sizes divides `size`."""
    kept, product = [], 1
    for axis in axes:
        if size % (product * mesh_shape[axis]):
            break
        kept.append(axis)
        product *= mesh_shape[axis]
    return tuple(kept)


def mesh_rules(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules=None):
    """The rules to run on `mesh`: `rules` (default: the current ones), plus `seq` on `context` when the mesh splits
    `context` and the rules place `seq` nowhere, so a mesh with context > 1 trains with the sequence split (the
    `long` preset is exactly `train` plus that)."""
    rules = get_rules(rules)
    if dict(mesh.shape).get(MeshAxis.CONTEXT, 1) > 1 and not rules.get(Axis.SEQ):
        return {**rules, Axis.SEQ: (MeshAxis.CONTEXT,)}
    return rules


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes a parameter was declared with (`layers` included once a unit is stacked)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"variable of shape {variable.shape} declares no logical axes")
    return tuple(axes)


def state_shardings(state, mesh: jax.sharding.Mesh, rules=None):
    """NamedShardings for every Variable of an (abstract) nnx.State, resolved strictly from its logical axes; under
    rules that use `fsdp`, a parameter that none of its axes puts on `fsdp` is split there anyway
    (`fsdp_fallback`)."""
    rules = get_rules(rules)
    mesh_shape = dict(mesh.shape)
    fsdp = mesh_shape.get(MeshAxis.FSDP, 1) if any(MeshAxis.FSDP in axes for axes in rules.values()) else 1

    def one(variable):
        axes = variable_axes(variable)
        spec = logical_to_spec(axes, rules, strict=True, mesh_shape=mesh_shape)
        if fsdp > 1 and isinstance(variable, nnx.Param):
            spec = fsdp_fallback(spec, axes, variable.shape, fsdp)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def fsdp_fallback(spec: PartitionSpec, axes: Sequence[str | None], shape: Sequence[int],
                  fsdp: int) -> PartitionSpec:
    """A parameter without `embed` (V4's wq_b [q_lora, heads, head_dim], wo_a [groups, heads, head_dim, o_lora])
    would be whole on every fsdp device, with its optimizer moments: a third of V4-Flash's weights. Such a weight
    is split over `fsdp` along its largest unsharded dimension that `fsdp` divides (never the stacked `layers`
    axis, which the layer scan slices), and gathered per layer like any other fsdp weight."""
    if any(MeshAxis.FSDP in mesh_axes(entry) for entry in spec):
        return spec
    free = [i for i, (entry, axis) in enumerate(zip(spec, axes))
            if entry is None and axis != Axis.LAYERS and shape[i] % fsdp == 0]
    if not free:
        return spec
    widest = max(free, key=lambda i: shape[i])
    return PartitionSpec(*(MeshAxis.FSDP.value if i == widest else entry for i, entry in enumerate(spec)))
