"""Ahead-of-time compilation for TPU pod topologies: does a run fit a slice, and how fast does XLA expect it to go.

With libtpu installed (the dev extra), `jax.experimental.topologies` describes any TPU slice on a machine that has
no TPU. `compile_steps` builds the run's five-axis mesh on that slice's devices, lowers the real jitted train step,
prefill and decode step (`step.jit_train_step`, `decode._prefill_chunk`, `decode._extend_jit`) over abstract
arguments (ShapeDtypeStructs carrying their shardings: nothing is allocated) and compiles each for the chip.
XLA's compiled executable then reports, per device: the bytes of its arguments, outputs (less those aliased to
donated arguments), temporaries and code (`memory_analysis`), and its FLOPs, bytes accessed and estimated seconds
(`cost_analysis`). A step fits when that total is within the device's HBM (`CHIPS`: the vendor's nominal
capacity, of which the runtime keeps a little for itself, so a step within a few percent of it is marginal).

MFU here is model FLOPs (cost.py's analytic count, the same one training logs) over XLA's estimated seconds times
the device's peak: what the step would reach if XLA's estimate held. It is a model of the hardware, not a
measurement; its use is comparing meshes and configs before a pod is booked.

Configs in `configs/` say where they run with a `pod()` function returning a `PodPlan` (topology, mesh, steps and
the serving shape); `python -m train.compile_tpu` flags override any of it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import cost, model
from v4jax.config import ModelConfig
from v4jax.moe import dispatch
from v4jax.serving import cache as cache_lib, decode
from v4jax.sharding import MESH_AXES, MeshAxis, Preset, mesh_rules, state_shardings, variable_axes
from v4jax.training import metrics, optimizer, step
from v4jax.training.config import RunConfig

GiB = 1 << 30


class Step(enum.StrEnum):
    TRAIN = "train"  # one optimizer step over the run's global batch
    PREFILL = "prefill"  # one prefill call: `Serving.prefill_len` tokens per row into empty rows
    DECODE = "decode"  # one token per row through a cache of `Serving.max_len` positions


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the topology prefix: "v5p" in "v5p:8x8x8"
    peak_key: str  # its `metrics.PEAK_FLOPS` entry (bf16 FLOP/s per chip)
    hbm_bytes: int  # per chip (Google Cloud TPU docs, "System architecture")
    hbm_bandwidth: float  # bytes/s per chip (same tables)
    chip_config: str = "default"  # libtpu's chip config: how a chip appears as JAX devices


CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("v4", "TPU v4", 32 * GiB, 1200e9, chip_config="megacore"),  # one device per chip, as JAX runs v4
    Chip("v5e", "TPU v5e", 16 * GiB, 819e9),
    Chip("v5p", "TPU v5p", 95 * GiB, 2765e9),
    Chip("v6e", "TPU v6e", 32 * GiB, 1640e9),
    Chip("tpu7x", "TPU7x", 192 * GiB, 7380e9),  # Ironwood: two TensorCores per chip, each its own device
)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Serving:
    """The serving shape a prefill / decode step compiles for."""
    batch: int = 8  # rows (the engine's slots)
    max_len: int = 8192  # cache positions per row
    prefill_len: int = 2048  # prompt tokens per row in one prefill call

    def __post_init__(self):
        for field in ("batch", "max_len", "prefill_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"Serving.{field}: must be >= 1, got {getattr(self, field)}")
        if self.prefill_len > self.max_len:
            raise ValueError(f"Serving.prefill_len {self.prefill_len} exceeds max_len {self.max_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodPlan:
    """Where a config runs: `configs/<name>.py` may define `pod() -> PodPlan`."""
    topology: str  # "v5p:8x8x8": chip kind and the slice's chip grid
    mesh: Mapping[str, int]  # mesh axis sizes over all devices of all slices (axes left out are 1)
    slices: int = 1  # slices joined over the data-centre network; `data` spans them
    steps: tuple[Step, ...] = (Step.TRAIN,)
    serving: Serving = dataclasses.field(default_factory=Serving)


def config_plan(name: str) -> PodPlan | None:
    """The `pod()` plan of `configs/<name>.py`, or None when it has none."""
    module = importlib.import_module(f"configs.{name}")
    return module.pod() if hasattr(module, "pod") else None


def resolve_plan(name: str, *, topology: str | None = None, slices: int | None = None, mesh: str | None = None,
                 step: str | None = None, batch: int | None = None, max_len: int | None = None,
                 prefill_len: int | None = None) -> PodPlan:
    """The config's plan with the given fields replaced (`step` "all": every step); ValueError when there is no
    plan and `topology` or `mesh` is missing."""
    plan = config_plan(name)
    if plan is None and not (topology and mesh):
        raise ValueError(f"config {name!r} has no pod() plan: give --topology and --mesh")
    if step == "all" or (step is None and plan is None):
        steps = tuple(Step)
    else:
        steps = (Step(step),) if step else plan.steps
    base = plan.serving if plan else Serving()
    given = dict(batch=batch, max_len=max_len, prefill_len=prefill_len)
    serving = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    return PodPlan(topology=topology or plan.topology, mesh=parse_mesh(mesh) if mesh else plan.mesh,
                   slices=slices if slices is not None else plan.slices if plan else 1, steps=steps,
                   serving=serving)


# ---------------------------------------------------------------------------------------------------------------
# the slice


@dataclasses.dataclass(frozen=True)
class Pod:
    topology: str
    chip: Chip
    devices: tuple  # every device of every slice
    slices: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in self.devices})

    @property
    def device_hbm(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def device_peak(self) -> float:
        return metrics.PEAK_FLOPS[self.chip.peak_key] / self.devices_per_chip

    @property
    def device_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip

    def describe(self) -> str:
        chips = len(self.devices) // self.devices_per_chip
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.topology}{slices}: {chips} chips, {len(self.devices)} devices of "
                f"{self.device_hbm / GiB:.0f} GiB HBM and {self.device_peak / 1e12:.0f} TFLOP/s bf16")


def pod(topology: str, slices: int = 1) -> Pod:
    """The devices of `slices` TPU slices of `topology` ("v5e:2x2", "v5p:8x8x8"), described by libtpu (no TPU
    needed). ValueError for an unknown chip or grid, RuntimeError when libtpu is missing."""
    name, _, grid = topology.partition(":")
    if name not in CHIPS:
        raise ValueError(f"topology {topology!r}: unknown chip {name!r}; known: {', '.join(CHIPS)}")
    try:
        dims = [int(d) for d in grid.split("x")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"topology {topology!r}: expected <chip>:<grid> such as v5p:8x8x8 or v5e:4x4")
    if slices < 1:
        raise ValueError(f"slices must be >= 1, got {slices}")
    hosts = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))  # 4 chips per host (2 on a 2x1 grid)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"cannot describe {topology}: libtpu is not installed "
                           f"(pip install 'jax[tpu]=={jax.__version__}')")
    _compile_only_libtpu(f"{name}-{math.prod(dims)}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chip_config_name=CHIPS[name].chip_config,
                                            chips_per_host_bounds=hosts, num_slices=slices)
    except Exception as error:  # libtpu's errors for a grid it doesn't know are multi-line XlaRuntimeErrors
        raise ValueError(f"topology {topology!r}: {' '.join(str(error).split())[:300]}") from None
    return Pod(topology, CHIPS[name], tuple(desc.devices), slices)


def _compile_only_libtpu(accelerator: str):
    """Settings for libtpu on a host without TPUs, before its first use: several processes may load it at once (it
    only compiles), and its runtime is told an accelerator type and host so it doesn't query cloud metadata and
    print a page of warnings. Names already set, or a process running on TPUs, are left alone."""
    if jax.default_backend() == "tpu":
        return
    for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_ACCELERATOR_TYPE", accelerator), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(name, value)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=64" -> {"data": 2, "fsdp": 64}; ValueError naming the bad part."""
    sizes = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs over {', '.join(MESH_AXES)}, got {part!r}")
        sizes[key] = int(value)
    return sizes


def pod_mesh(the_pod: Pod, sizes: Mapping[str, int]) -> jax.sharding.Mesh:
    """The five-axis mesh over every device of the pod: within a slice laid out on the chip torus, and over several
    slices with `data` split across them (its all-reduce is the only traffic that crosses the slower network)."""
    full = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; axes are {', '.join(MESH_AXES)}")
    count = len(the_pod.devices)
    if math.prod(full.values()) != count:
        raise ValueError(f"mesh {mesh_text(full)} covers {math.prod(full.values())} devices but "
                         f"{the_pod.topology} x {the_pod.slices} has {count}")
    if full[MeshAxis.DATA] % the_pod.slices:
        raise ValueError(f"mesh {mesh_text(full)}: data={full[MeshAxis.DATA]} must be a multiple of the "
                         f"{the_pod.slices} slices it spans")
    from jax.experimental import mesh_utils

    # An axis may take part of a physical torus dimension (fsdp=8 on a 4x4x4 slice): jax.make_mesh refuses that.
    if the_pod.slices == 1:
        grid = mesh_utils.create_device_mesh(tuple(full.values()), list(the_pod.devices),
                                             allow_split_physical_axes=True)
    else:
        ici = (full[MeshAxis.DATA] // the_pod.slices, *list(full.values())[1:])
        dcn = (the_pod.slices,) + (1,) * (len(MESH_AXES) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=list(the_pod.devices),
                                                    allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, tuple(str(a) for a in MESH_AXES),
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_text(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1 device"


# ---------------------------------------------------------------------------------------------------------------
# lowering the real steps over abstract arguments


def check_train_batch(run: RunConfig, mesh: jax.sharding.Mesh) -> None:
    """ValueError (one line) when `train.batch_size` rows do not split evenly over the mesh's batch axes."""
    sharding = step.batch_sharding(mesh)
    try:
        sharding.shard_shape((run.train.batch_size, run.train.seq_len))
    except ValueError:
        rows = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(sharding.spec[0] or ())))
        raise ValueError(f"train.batch_size={run.train.batch_size} does not split over the {rows} batch shards of "
                         f"mesh {mesh_text(dict(mesh.shape))}; use a multiple of {rows} (--set "
                         f"train.batch_size=N)") from None


def lower_train(run: RunConfig, mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    """The training loop's jitted step over the run's global batch (`train.batch_size` x `train.seq_len`)."""
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    state = step.abstract_state(run, opt, mesh)
    sharding = step.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((run.train.batch_size, run.train.seq_len), jnp.int32, sharding=sharding)
             for name in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    return step.jit_train_step(run, opt, state, mesh).lower(state, batch)


def _serving_args(cfg: ModelConfig, serving: Serving, mesh, tokens: int):
    params = model.abstract(cfg, mesh, Preset.SERVE)
    spec = cache_lib.cache_spec(cfg, serving.batch, serving.max_len)
    shardings = cache_lib.cache_shardings(spec, mesh)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), spec, shardings)
    rows = jax.sharding.NamedSharding(mesh, shardings.lengths.spec)
    return (params, cache, jax.ShapeDtypeStruct((serving.batch, tokens), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((serving.batch,), jnp.int32, sharding=rows))


def prefill_tokens(cfg: ModelConfig, serving: Serving, mesh) -> tuple[int, bool]:
    """(padded tokens per row, split) of the prefill call `decode.prefill` makes for a `prefill_len` prompt: on a
    mesh that splits `context`, one pass with the sequence split, else one chunk of `prefill_len`."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        shards = decode.context_shards()
    if shards > 1:
        return decode.split_prefill_length(cfg, serving.prefill_len, shards, serving.prefill_len), True
    return serving.prefill_len, False


def lower_prefill(cfg: ModelConfig, serving: Serving, mesh) -> jax.stages.Lowered:
    tokens, split = prefill_tokens(cfg, serving, mesh)
    with jax.set_mesh(mesh):
        return decode._prefill_chunk.lower(cfg, *_serving_args(cfg, serving, mesh, tokens), split)


def lower_decode(cfg: ModelConfig, serving: Serving, mesh) -> jax.stages.Lowered:
    with jax.set_mesh(mesh):
        return decode._extend_jit.lower(cfg, *_serving_args(cfg, serving, mesh, 1))


def serving_config(run: RunConfig) -> ModelConfig:
    """The model the serving steps run: the run's compute dtype (parameters stay in the model's `param_dtype`)."""
    return run.model.replace(dtype=run.train.compute_dtype)


def model_flops(run: RunConfig, which: Step, serving: Serving) -> float:
    """cost.py's forward (x3 for training) FLOPs of one whole step, all devices together."""
    if which == Step.TRAIN:
        return metrics.train_flops_per_step(run)
    cfg = run.model
    if which == Step.PREFILL:
        return cost.flops_per_token(cfg, serving.prefill_len, cost.Phase.PREFILL) * serving.batch * serving.prefill_len
    return cost.flops_per_token(cfg, serving.max_len, cost.Phase.DECODE) * serving.batch


def partition_specs(run: RunConfig, sizes: Mapping[str, int]) -> str:
    """Every parameter's (and router bias's) path, shape, logical axes and PartitionSpec under the `train` rules on
    a mesh of `sizes`, one line each: the golden sharding file a test compares against (no devices needed)."""
    full = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    mesh = jax.sharding.AbstractMesh(tuple(full.values()), tuple(full),
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(full))
    state = model.abstract(run.model)
    shardings = dict(state_shardings(state, mesh, mesh_rules(mesh, Preset.TRAIN)).flat_state())
    lines = [f"# {run.model.name}: parameter shardings under the train rules on mesh {mesh_text(full)}",
             "# path  shape  logical axes  PartitionSpec"]
    for path, variable in state.flat_state():
        axes = ",".join(str(a) if a is not None else "-" for a in variable_axes(variable))
        spec = shardings[path].get_value().spec
        lines.append(f"{'/'.join(map(str, path))}  {list(variable.shape)}  ({axes})  {spec}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# compiling and reporting


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compiled step, per device."""
    step: Step
    argument_bytes: int
    output_bytes: int  # outputs that do not reuse a donated argument's buffer
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    xla_flops: float
    xla_bytes: float  # bytes accessed in HBM, XLA's count
    xla_seconds: float  # XLA's estimate of one step (nan: it gave none, as for programs with loops it can't bound)
    roofline_seconds: float  # max(XLA's FLOPs / peak, its bytes / HBM bandwidth)
    model_flops: float  # cost.py's count, this device's share
    peak_flops: float
    compile_seconds: float
    out_of_memory: str = ""  # XLA's report (first line, then its largest buffers) when it refused to compile

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and self.total_bytes <= self.hbm_bytes

    @property
    def seconds(self) -> float:
        """The step time MFU is computed from: XLA's estimate where it gives one, else the roofline bound."""
        return self.xla_seconds if self.xla_seconds > 0 else self.roofline_seconds

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.peak_flops) if self.seconds > 0 else math.nan


def analyse(which: Step, compiled: jax.stages.Compiled, the_pod: Pod, flops: float,
            compile_seconds: float) -> StepReport:
    memory = compiled.memory_analysis()
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs  # older JAX: one dict per program
    xla_flops, xla_bytes = float(costs.get("flops", math.nan)), float(costs.get("bytes accessed", math.nan))
    xla_seconds = float(costs.get("optimal_seconds", math.nan))
    return StepReport(
        step=which, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        hbm_bytes=the_pod.device_hbm, xla_flops=xla_flops, xla_bytes=xla_bytes,
        xla_seconds=xla_seconds if xla_seconds > 0 else math.nan,
        roofline_seconds=max(xla_flops / the_pod.device_peak, xla_bytes / the_pod.device_bandwidth),
        model_flops=flops / len(the_pod.devices),
        peak_flops=the_pod.device_peak, compile_seconds=compile_seconds)


LOWER: dict[Step, Callable] = {
    Step.TRAIN: lambda run, serving, mesh: lower_train(run, mesh),
    Step.PREFILL: lambda run, serving, mesh: lower_prefill(serving_config(run), serving, mesh),
    Step.DECODE: lambda run, serving, mesh: lower_decode(serving_config(run), serving, mesh),
}


def compile_steps(run: RunConfig, the_pod: Pod, mesh: jax.sharding.Mesh, steps: Sequence[Step],
                  serving: Serving = Serving(), progress: Callable[[str], None] | None = None) -> list[StepReport]:
    """Lower and compile each step for the pod's chip and report it (see the module docstring)."""
    dispatch.probe_ragged_all_to_all(the_pod.devices)  # the MoE exchange the pod's chips compile, not the host's
    reports = []
    for which in steps:
        if progress:
            progress(f"compiling the {which} step for {the_pod.topology} ...")
        start = time.perf_counter()
        flops = model_flops(run, which, serving)
        try:
            compiled = LOWER[which](run, serving, mesh).compile()
        except _RUNTIME_ERROR as error:  # the TPU compiler refuses a program that cannot fit its HBM
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            reports.append(_refused(which, the_pod, flops, time.perf_counter() - start, str(error)))
            continue
        reports.append(analyse(which, compiled, the_pod, flops, time.perf_counter() - start))
    return reports


_RUNTIME_ERROR = getattr(jax.errors, "JaxRuntimeError", RuntimeError)


def _refused(which: Step, the_pod: Pod, flops: float, seconds: float, message: str) -> StepReport:
    message = message.strip().removeprefix("RESOURCE_EXHAUSTED: ")
    return StepReport(step=which, argument_bytes=0, output_bytes=0, temp_bytes=0, code_bytes=0,
                      hbm_bytes=the_pod.device_hbm, xla_flops=math.nan, xla_bytes=math.nan, xla_seconds=math.nan,
                      roofline_seconds=math.nan, model_flops=flops / len(the_pod.devices),
                      peak_flops=the_pod.device_peak, compile_seconds=seconds, out_of_memory=message)


def table(reports: Sequence[StepReport]) -> str:
    """Per-device memory against HBM, XLA's cost estimate and the implied MFU, one row per step."""
    head = ("step", "args GiB", "out GiB", "temp GiB", "total GiB", "HBM GiB", "fits", "XLA TFLOP", "XLA GB",
            "XLA ms", "roofline ms", "MFU", "compile s")
    rows = [head]
    for r in reports:
        if r.out_of_memory:
            rows.append((str(r.step), *["-"] * 4, f"{r.hbm_bytes / GiB:.2f}", "NO", *["-"] * 5,
                         f"{r.compile_seconds:.0f}"))
            continue
        rows.append((str(r.step), *(f"{b / GiB:.2f}" for b in (r.argument_bytes, r.output_bytes, r.temp_bytes,
                                                                r.total_bytes, r.hbm_bytes)),
                     "yes" if r.fits else "NO", f"{r.xla_flops / 1e12:.3f}", f"{r.xla_bytes / 1e9:.2f}",
                     _ms(r.xla_seconds), _ms(r.roofline_seconds), f"{r.mfu:.1%}" if np.isfinite(r.mfu) else "-",
                     f"{r.compile_seconds:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if np.isfinite(seconds) else "-"


def misfits(reports: Sequence[StepReport], the_pod: Pod) -> list[str]:
    """One line per step that does not fit."""
    lines = []
    for r in reports:
        if r.out_of_memory:
            lines.append(f"the {r.step} step does not compile for a {the_pod.chip.name} device's "
                         f"{r.hbm_bytes / GiB:.0f} GiB: XLA: {r.out_of_memory.splitlines()[0]}")
        elif not r.fits:
            lines.append(f"the {r.step} step needs {r.total_bytes / GiB:.2f} GiB per device but a "
                         f"{the_pod.chip.name} device has {r.hbm_bytes / GiB:.0f} GiB")
    return lines
