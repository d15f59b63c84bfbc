"""The device mesh: five named axes on every machine, size 1 where unused, all `AxisType.Auto`.

Auto axes let GSPMD propagate shardings from the parameters and the few `constrain` pins; JAX >= 0.10 would
otherwise make `jax.make_mesh` axes Explicit.
"""

from __future__ import annotations

import enum
import math

import jax
from jax.sharding import AxisType, Mesh


class MeshAxis(enum.StrEnum):
    DATA = "data"  # pure data parallelism (replicated weights)
    FSDP = "fsdp"  # data parallelism with weights sharded and gathered per layer
    CONTEXT = "context"  # the sequence split (long-context training and prefill)
    EXPERT = "expert"  # routed experts split across devices
    TENSOR = "tensor"  # heads / MLP width split (Megatron style)


MESH_AXES = tuple(MeshAxis)


def make_mesh(data: int = 1, fsdp: int = 1, context: int = 1, expert: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
    """A mesh over the first data*fsdp*context*expert*tensor devices (all of them if `devices` is None)."""
    sizes = dict(data=data, fsdp=fsdp, context=context, expert=expert, tensor=tensor)
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    need = math.prod(sizes.values())
    devices = jax.devices() if devices is None else list(devices)
    if need > len(devices):
        raise ValueError(f"make_mesh: {sizes} needs {need} devices but only {len(devices)} are available")
    return jax.make_mesh(tuple(sizes.values()), tuple(str(a) for a in MESH_AXES), axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:need])
