"""Logical -> mesh axis rules, in named presets.

A rule maps a logical axis to a tuple of mesh axes (sharded over their product) or to nothing (replicated).
Within one tensor a mesh axis can shard only one dimension. Resolution is first-come: `("batch", "seq", "embed")`
under `train` shards batch over (data, fsdp, expert) and leaves embed whole, because fsdp is taken. Parameters are
resolved strictly: if a rule asks to shard a weight dimension over a mesh axis that an earlier dimension already
took, that is a collision in the preset and `logical_to_spec(..., strict=True)` raises, naming both axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator, Mapping, Sequence

from jax.sharding import PartitionSpec

from v4jax.sharding.axes import ALL as LOGICAL_AXES, Axis
from v4jax.sharding.mesh import MESH_AXES, MeshAxis

Rules = Mapping[str, tuple[str, ...]]


class Preset(enum.StrEnum):
    TRAIN = "train"  # fsdp + expert + tensor parallelism, batch over every data-like axis
    LONG = "long"  # train, with the sequence split over `context`
    SERVE = "serve"  # weights over expert + tensor only (no fsdp gathers in the decode loop); long caches over context


_D, _F, _C, _E, _T = (MeshAxis.DATA, MeshAxis.FSDP, MeshAxis.CONTEXT, MeshAxis.EXPERT, MeshAxis.TENSOR)

_TRAIN: dict[str, tuple[str, ...]] = {
    Axis.BATCH: (_D, _F, _E),
    Axis.EMBED: (_F,),
    Axis.VOCAB: (_T,),
    Axis.HEADS: (_T,),
    Axis.MLP: (_T,),
    Axis.EXPERTS: (_E,),
}

PRESETS: dict[Preset, Rules] = {
    Preset.TRAIN: _TRAIN,
    Preset.LONG: _TRAIN | {Axis.SEQ: (_C,)},
    Preset.SERVE: {Axis.BATCH: (_D,), Axis.VOCAB: (_T,), Axis.HEADS: (_T,), Axis.MLP: (_T,),
                   Axis.EXPERTS: (_E,), Axis.CACHE_SEQ: (_C,)},
}


def check_rules(rules: Rules) -> Rules:
    """Names must be known on both sides and no logical axis may list one mesh axis twice."""
    for logical, mesh_axes in rules.items():
        if logical not in LOGICAL_AXES:
            raise ValueError(f"sharding rules: unknown logical axis {logical!r}")
        unknown = [m for m in mesh_axes if m not in MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rules: {logical!r} maps to unknown mesh axes {unknown}")
        if len(set(mesh_axes)) != len(mesh_axes):
            raise ValueError(f"sharding rules: {logical!r} lists a mesh axis twice: {mesh_axes}")
    return rules


for _rules in PRESETS.values():
    check_rules(_rules)

_current: contextvars.ContextVar[Rules] = contextvars.ContextVar("v4jax_rules", default=PRESETS[Preset.TRAIN])


def get_rules(name: Preset | str | Rules | None = None) -> Rules:
    if name is None:
        return _current.get()
    if isinstance(name, Mapping):
        return check_rules(name)
    try:
        return PRESETS[Preset(name)]
    except ValueError:
        raise ValueError(f"unknown sharding rules preset {name!r}; known: {[p.value for p in Preset]}") from None


@contextlib.contextmanager
def use_rules(name: Preset | str | Rules) -> Iterator[Rules]:
    """Make a preset (or a custom mapping) the one `constrain` and `init` use inside the block."""
    token = _current.set(get_rules(name))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def logical_to_spec(logical: Sequence[str | None], rules: Rules | None = None, *, strict: bool = False,
                    mesh_shape: Mapping[str, int] | None = None) -> PartitionSpec:
    """Map one tensor's logical axes to a PartitionSpec.

    `mesh_shape` drops mesh axes of size 1 (they shard nothing and would only clutter specs). `strict` turns a
    mesh axis wanted by two dimensions into an error instead of first-come.
    """
    rules = get_rules() if rules is None else rules
    taken: dict[str, str] = {}
    spec = []
    for name in logical:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r} in {tuple(logical)}")
        assigned = []
        for mesh_axis in rules.get(name, ()) if name is not None else ():
            if mesh_shape is not None and mesh_shape.get(mesh_axis, 1) == 1:
                continue
            if mesh_axis in taken:
                if strict:
                    raise ValueError(f"sharding collision in {tuple(logical)}: mesh axis {mesh_axis!r} is wanted "
                                     f"by both {taken[mesh_axis]!r} and {name!r}")
                continue
            taken[mesh_axis] = str(name)
            assigned.append(str(mesh_axis))
        spec.append(None if not assigned else assigned[0] if len(assigned) == 1 else tuple(assigned))
    return PartitionSpec(*spec)
