"""Multi-process (multi-host) runs: one process per host, every host running the same command.

`initialize()` joins the processes into one JAX runtime (`jax.distributed.initialize`): afterwards `jax.devices()`
lists every process's devices, a mesh spans them all, and each jitted step is one program across the hosts. On a TPU
pod slice (and on SLURM, Open MPI, ... clusters) the coordinator address, process count and process id are detected
from the environment; elsewhere they are given explicitly. Must run before anything touches a JAX device.

What else changes with several processes (see `loop.py`): each process reads only its block of each global batch
(`batch_slot`) and assembles the global batch with `jax.make_array_from_process_local_data`; values fetched to the
host are gathered first (`fetch`); checkpoints are written by all processes together (orbax), so the workdir must be
a path every host sees.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`, with CPU cross-process collectives switched on. All three arguments or none
    (None: detected from the environment). Raises ValueError for a bad combination (one line)."""
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("coordinator, num_processes and process_id go together: give all three or none "
                         "(none: detected from the TPU pod / cluster environment)")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process id must be in [0, {num_processes}) for {num_processes} processes, "
                             f"got {process_id}")
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _cpu_collectives() -> None:
    """CPU devices of different processes exchange data over TCP with gloo; without an implementation, a program
    spanning them fails. Recent JAX defaults to gloo; older ones name the setting differently or have it off."""
    names = jax.config.values
    if names.get("jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    elif "jax_cpu_enable_gloo_collectives" in names and not names["jax_cpu_enable_gloo_collectives"]:
        jax.config.update("jax_cpu_enable_gloo_collectives", True)


def is_primary() -> bool:
    """Process 0: the one that prints and logs."""
    return jax.process_index() == 0


def check_mesh(mesh) -> None:
    """With several processes the run needs a mesh over every device of every process (without one, or with only
    some devices, each process would train on its own). Raises ValueError (one line)."""
    count = jax.process_count()
    if count == 1:
        return
    if mesh is None:
        raise ValueError(f"{count} processes need a mesh over all {jax.device_count()} devices (--mesh)")
    if mesh.devices.size != jax.device_count():
        raise ValueError(f"the mesh has {mesh.devices.size} devices but the {count} processes have "
                         f"{jax.device_count()}; its axis sizes must multiply to {jax.device_count()}")


def batch_slot(sharding, shape: tuple[int, int]) -> tuple[int, int]:
    """(index, count): this process's devices hold rows [index * B/count, (index + 1) * B/count) of a global batch
    of `shape` = (B, seq_len) placed with `sharding`, so it reads block `index` of `count` (`count` < process count
    where processes hold the same rows). None sharding: (0, 1). Raises ValueError when the rows this process holds
    are not one such block (a mesh whose batch axes interleave processes)."""
    if sharding is None:
        return 0, 1
    batch_size = shape[0]
    indices = sharding.addressable_devices_indices_map(tuple(shape)).values()
    rows = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in indices})
    start, stop = rows[0][0], rows[-1][1]
    size = stop - start
    contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    if not contiguous or batch_size % size or start % size:
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows} of {batch_size}: not one "
                         "contiguous block; order the mesh so each process's devices share the batch axes' "
                         "leading positions")
    return start // size, batch_size // size


def global_batch(batch: dict, sharding, batch_size: int) -> dict:
    """The global batch, as jax arrays placed with `sharding`, from this process's rows (its `batch_slot` block;
    one process: the whole batch, put on the mesh; None sharding: the default device)."""
    local = {name: np.asarray(v, np.int32) for name, v in batch.items()}
    if sharding is None or jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {name: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for name, v in local.items()}


def fetch(tree):
    """`jax.device_get`, but an array split across processes is gathered first (every process gets the whole
    value; a plain fetch of it fails)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return x
    return jax.device_get(jax.tree.map(one, tree))


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here. The coordination service's barrier, not a device collective, so it runs
    no program that could interleave with the steps' (and is free of gloo's timeouts on CPU). `name`: unique per
    call site; repeated calls are numbered."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (one process: `flag`). A collective: all must call it."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
