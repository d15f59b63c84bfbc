"""Ahead-of-time compiles for TPU topologies (libtpu describes the slice; no TPU here): the real train and decode
steps of tiny-v4 compile for a v5e slice and report memory that accounts for their arguments; an oversized serving
shape is reported as not fitting (exit 1); bad input exits 2. The full presets' plans run under `-m slow`."""

import difflib
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from v4jax import aot
from v4jax.serving import cache as cache_lib
from v4jax.sharding import Preset
from v4jax.training import optimizer, overrides, step

pytest.importorskip("libtpu", reason="the dev extra installs libtpu (jax[tpu])")

from train import compile_tpu  # noqa: E402


def shard_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree of ShapeDtypeStructs with shardings (the most-loaded device)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def v5e():
    pod = aot.pod("v5e:2x2")
    return pod, aot.pod_mesh(pod, {"data": 2, "expert": 2})


@pytest.fixture(scope="module")
def tiny_reports(v5e):
    pod, mesh = v5e
    run = overrides.load_config("tiny_v4")
    serving = aot.Serving(batch=4, max_len=512, prefill_len=64)
    return run, serving, aot.compile_steps(run, pod, mesh, (aot.Step.TRAIN, aot.Step.DECODE), serving)


def test_topology_describes_the_chips():
    pod = aot.pod("v5e:2x2")
    assert len(pod.devices) == 4 and pod.devices_per_chip == 1
    assert pod.device_hbm == 16 * aot.GiB and pod.device_peak == 197e12
    ironwood = aot.pod("tpu7x:2x2x1")  # two TensorCores per chip, each a device with half the chip
    assert len(ironwood.devices) == 8 and ironwood.devices_per_chip == 2
    assert ironwood.device_hbm == 96 * aot.GiB
    two = aot.pod("v5p:2x2x1", slices=2)
    mesh = aot.pod_mesh(two, {"data": 2, "fsdp": 4})
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # data spans the slices, fsdp stays inside one


def test_tiny_v4_train_and_decode_compile_for_v5e(tiny_reports, v5e):
    run, serving, (train, decode) = tiny_reports
    pod, mesh = v5e
    for report in (train, decode):
        assert report.fits and not report.out_of_memory
        assert report.total_bytes == (report.argument_bytes + report.output_bytes + report.temp_bytes
                                      + report.code_bytes)
        assert 0 < report.total_bytes < report.hbm_bytes == 16 * aot.GiB
        assert report.xla_flops > 0 and report.roofline_seconds > 0 and report.mfu > 0
    # The arguments are the state (or parameters and cache) this device holds, at least: TPU tiles pad small dims.
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    state_bytes = shard_bytes(step.abstract_state(run, opt, mesh))
    assert state_bytes <= train.argument_bytes < 4 * state_bytes
    # The train step donates its state: outputs reuse the arguments' buffers, only the metrics are new.
    assert train.output_bytes < 0.05 * train.argument_bytes
    cfg = aot.serving_config(run)
    spec = cache_lib.cache_spec(cfg, serving.batch, serving.max_len)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), spec,
                         cache_lib.cache_shardings(spec, mesh))
    from v4jax import model
    served = shard_bytes(model.abstract(cfg, mesh, Preset.SERVE)) + shard_bytes(cache)
    assert served <= decode.argument_bytes < 4 * served
    # Model FLOPs are cost.py's, split over the devices.
    assert train.model_flops == pytest.approx(aot.model_flops(run, aot.Step.TRAIN, serving) / len(pod.devices))
    table = aot.table([train, decode])
    assert table.splitlines()[1].split()[0] == "train" and table.splitlines()[2].split()[0] == "decode"


def test_the_tpu_program_uses_the_tpu_moe_exchange(v5e):
    """Compiled for TPU on a CPU host, the MoE takes the TPU path (ragged_all_to_all, probed on the pod's own
    devices), not the host's emulation."""
    pod, mesh = v5e
    run = overrides.load_config("tiny_v4")
    aot.compile_steps(run, pod, mesh, ())  # probes the pod's devices
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        from v4jax.moe import dispatch
        assert dispatch.target_platform() == "tpu" and dispatch.local_impl() == "ragged"
    assert dispatch.ragged_all_to_all_supported("tpu")
    assert dispatch.target_platform() == "cpu"


def test_optimizer_moments_take_their_parameters_shardings():
    from v4jax import sharding
    run = overrides.load_config("tiny_v4")
    mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    state = step.abstract_state(run, opt, mesh)
    params = {tuple(map(str, p)): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    matched = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = tuple(map(str, path))
        owner = next((params[keys[i:]] for i in range(len(keys)) if keys[i:] in params), None)
        if owner is not None and owner.shape == leaf.shape:
            assert leaf.sharding == owner.sharding, keys
            matched += 1
        else:
            assert leaf.sharding.is_fully_replicated
    assert matched >= len(params)  # every parameter has at least one moment
    assert shard_bytes(state.opt_state) < 0.4 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))


def test_oversized_serving_shape_does_not_fit(capsys):
    code = compile_tpu.main(["--config", "tiny_v4", "--topology", "v5e:2x2", "--mesh", "data=4", "--step",
                             "decode", "--batch", "256", "--max-len", "1048576"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "NO" in out.splitlines()[1]
    line = [x for x in err.splitlines() if "does not fit" in x]
    assert len(line) == 1 and "decode step" in line[0] and "16 GiB" in line[0]


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9:2x2", "--mesh", "data=4"], "unknown chip 'v9'"),
    (["--topology", "v5e:2x2", "--mesh", "data=8"], "covers 8 devices"),
    (["--topology", "v5e:2x2", "--mesh", "depth=4"], "expected axis=size"),
    (["--topology", "v5e:2x2"], "give --topology and --mesh"),
    (["--topology", "v5e:2x2", "--mesh", "data=2,expert=2", "--set", "train.batch_size=6"],
     "train.batch_size=6 does not split over the 4 batch shards"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        compile_tpu.main(["--config", "tiny_v4", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1]


PLANS = [name for name in overrides.available_configs() if aot.config_plan(name) is not None]


def test_every_production_config_has_a_plan():
    assert {"v4_flash_v5p", "v4_pro_v5p", "v4_flash_serve_v5p", "v4_pro_serve_v5p"} <= set(PLANS)


@pytest.mark.slow
@pytest.mark.parametrize("name", PLANS)
def test_production_plans_fit(name, capsys):
    """The README's table: every plan's steps compile for its slice and fit (minutes each)."""
    assert compile_tpu.main(["--config", name]) == 0, capsys.readouterr().err


GOLDEN = Path(__file__).parent / "golden" / "v4_flash_v5p_train_specs.txt"


def test_v4_flash_training_shardings_match_the_golden_file():
    """Every V4-Flash parameter's PartitionSpec on its production training mesh, against the checked-in file: a
    change to rules, logical axes or parameter layout shows up here as a diff to review. If it is intended:
    python -m train.compile_tpu --config v4_flash_v5p --dump-specs tests/golden/v4_flash_v5p_train_specs.txt"""
    run = overrides.load_config("v4_flash_v5p")
    now = aot.partition_specs(run, aot.config_plan("v4_flash_v5p").mesh)
    golden = GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(golden.splitlines(True), now.splitlines(True), "golden", "now", n=0))
    assert not diff, f"V4-Flash training shardings changed:\n{diff[:4000]}"
    lines = now.splitlines()[2:]
    assert len(lines) > 150 and all(line.count("  ") == 3 for line in lines)
