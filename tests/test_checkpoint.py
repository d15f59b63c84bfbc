"""Checkpoints: bit-exact round trip of a full train state, keep-last-N, crash safety (incomplete step dirs, a save
SIGKILLed before its commit), restore onto another mesh, config compatibility, data state, the stop flag."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from v4jax import config, model
from v4jax.sharding import make_mesh, state_shardings
from v4jax.training import checkpoint as ckpt
from v4jax.training.config import RunConfig, TrainConfig

CFG = config.preset("tiny-v4")


def run_config(**train):
    return RunConfig(model=CFG, train=TrainConfig(**train)).to_dict()


@jax.jit
def fake_training(params, extras):
    """AdamW's state structure (an nnx.State per moment inside optax namedtuples) with non-trivial values, and
    router biases moved off their zero init (hash tables stay: they are frozen)."""
    adam, *rest = optax.adamw(1e-3).init(params)
    adam = adam._replace(count=jnp.int32(7), mu=jax.tree.map(lambda p: 0.5 * p + 0.25, params),
                         nu=jax.tree.map(lambda p: p * p, params))
    extras = jax.tree.map(lambda x: x + jnp.linspace(-1, 1, x.shape[-1]) if x.dtype == jnp.float32 else x, extras)
    return (adam, *rest), extras


def split(state):
    params, extras = nnx.split_state(state, nnx.Param, ...)
    return params, extras


@pytest.fixture(scope="module")
def mesh_a():
    return make_mesh(data=2, expert=2, tensor=2)


@pytest.fixture(scope="module")
def train_state(mesh_a):
    """The loop's state on mesh A: step, params, extras (router bias, hash tables), optax state, rng key data."""
    host = model.init(CFG, jax.random.key(0))
    placed = jax.device_put(host, state_shardings(host, mesh_a))
    params, extras = split(placed)
    opt_state, extras = fake_training(params, extras)
    replicated = NamedSharding(mesh_a, P())
    return {
        "step": jax.device_put(jnp.int32(40), replicated),
        "params": params,
        "extras": extras,
        "opt_state": opt_state,
        "rng": jax.device_put(jax.random.key_data(jax.random.key(123)), replicated),
    }


def host_copy(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def assert_same_values(restored, expected_leaves):
    leaves = jax.tree.leaves(restored)
    assert len(leaves) == len(expected_leaves)
    for got, want in zip(leaves, expected_leaves):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # bit-exact (NaN-free trees)


def assert_shardings(restored, abstract):
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)


# ---------------------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_bit_exact(tmp_path, train_state):
    expected = host_copy(train_state)
    # the loop donates its state right after `save` returns: save a copy and delete it at once
    copy = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), s))(train_state)
    data_state = {"epoch": 1, "position": 12345, "shard": "train-00003", "rng": [1, 2, 3]}
    with ckpt.Checkpointer(tmp_path, run_config(checkpoint_every=20)) as c:
        assert c.latest_step() is None
        assert c.save(40, copy, data_state)
        for leaf in jax.tree.leaves(copy):
            leaf.delete()
        c.wait()
        assert c.latest_step() == 40 and c.all_steps() == [40]
        abstract = ckpt.abstract_like(train_state)
        restored, restored_data = c.restore(abstract)
    assert restored_data == data_state
    assert jax.tree.structure(restored) == jax.tree.structure(train_state)  # nnx.State + Variable metadata intact
    assert isinstance(restored["params"], nnx.State) and isinstance(restored["extras"], nnx.State)
    assert_same_values(restored, expected)
    assert_shardings(restored, abstract)
    # integer state survives exactly: step, rng key data, the hash tables
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 40
    assert restored["rng"].dtype == jnp.uint32
    extras = dict(nnx.to_flat_state(restored["extras"]))
    tables = [v for p, v in extras.items() if p[-1] == "tid2eid"]
    biases = [v for p, v in extras.items() if p[-1] == "bias"]
    assert tables and all(type(t).__name__ == "HashTable" and t.dtype == jnp.int32 for t in tables)
    assert biases and all(type(b).__name__ == "RouterBias" and float(jnp.abs(b[...]).max()) > 0 for b in biases)
    assert (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == CFG.hidden_size


def test_restore_onto_other_meshes(tmp_path, train_state):
    """Saved from (data=2, expert=2, tensor=2); restored into (fsdp=4, tensor=2) and onto one device."""
    expected = host_copy(train_state)
    with ckpt.Checkpointer(tmp_path, run_config()) as c:
        c.save(7, train_state, {"position": 7}, force=True)
        c.wait()
        for mesh in (make_mesh(fsdp=4, tensor=2), None):
            params, extras = split(model.abstract(CFG, mesh))  # ShapeDtypeStructs (with shardings on a mesh)
            rest = jax.eval_shape(lambda s: {"step": s["step"], "opt_state": s["opt_state"], "rng": s["rng"]},
                                  train_state)
            if mesh is not None:
                rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                   sharding=NamedSharding(mesh, P())), rest)
            abstract = {"step": rest["step"], "params": params, "extras": extras, "opt_state": rest["opt_state"],
                        "rng": rest["rng"]}
            restored, data_state = c.restore(abstract)
            assert data_state == {"position": 7}
            assert_same_values(restored, expected)
            if mesh is None:
                assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))
            else:
                assert_shardings(restored, abstract)
                assert {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set} <= set(
                    mesh.devices.flat)
                fsdp = [x for x in jax.tree.leaves(restored["params"]) if "fsdp" in str(x.sharding.spec)]
                assert fsdp  # the new mesh's layout, not the saved one


def test_restore_rejects_mismatched_tree(tmp_path):
    state = {"w": jnp.ones((4, 8)), "b": jnp.zeros((8,), jnp.int32)}
    with ckpt.Checkpointer(tmp_path, run_config()) as c:
        c.save(1, state, None, force=True)
        with pytest.raises(ValueError, match=r"w: shape \(4, 8\) saved, \(4, 9\) wanted"):
            c.restore({"w": jax.ShapeDtypeStruct((4, 9), jnp.float32), "b": state["b"]})
        with pytest.raises(ValueError, match="missing from the checkpoint.*extra"):
            c.restore({**state, "extra": jnp.ones(3)})
        with pytest.raises(ValueError, match=r"in the checkpoint but not in abstract_state: \['b'\]"):
            c.restore({"w": state["w"]})
        only_w, _ = c.restore({"w": state["w"]}, partial=True)  # e.g. params only, for evaluation
        np.testing.assert_array_equal(only_w["w"], state["w"])
        with pytest.raises(ValueError, match="dtype int32 saved, float32 wanted"):
            c.restore({"w": state["w"], "b": jnp.zeros((8,), jnp.float32)})
        with pytest.raises(FileNotFoundError):
            c.restore(state, step=2)
        restored, data_state = c.restore(state)
        assert data_state is None
        np.testing.assert_array_equal(restored["w"], state["w"])
        with pytest.raises(TypeError, match="key_data"):
            c.save(2, {"key": jax.random.key(0)}, force=True)
        with pytest.raises(ValueError, match="JSON"):
            c.save(3, state, {"position": (1, 2)}, force=True)


# ---------------------------------------------------------------------------------------------------------------
# cadence, retention, crash safety


def small_state(step):
    return {"w": jnp.full((16, 16), float(step)), "step": jnp.int32(step)}


@pytest.mark.parametrize("async_save", [True, False])
def test_cadence_and_keep_last_n(tmp_path, async_save):
    with ckpt.Checkpointer(tmp_path, run_config(checkpoint_every=2, keep_checkpoints=2), async_save=async_save) as c:
        assert c.keep == 2 and c.every == 2
        saved = [step for step in range(1, 10) if c.save(step, small_state(step), {"position": step})]
        assert saved == [2, 4, 6, 8]
        assert c.save(9, small_state(9), {"position": 9}, force=True)  # the end of the run / a signal
        assert not c.save(9, small_state(9), {"position": 9}, force=True)  # already saved
        c.wait()
        assert c.all_steps() == [8, 9]
        state, data_state = c.restore(small_state(0), step=8)
        assert int(state["step"]) == 8 and data_state == {"position": 8}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["8", "9", "trash"]
    assert not any((tmp_path / "checkpoints" / "trash").iterdir())  # retired steps are deleted on close


def test_incomplete_steps_are_never_latest(tmp_path):
    directory = tmp_path / "checkpoints"
    with ckpt.Checkpointer(tmp_path, run_config(), keep=0) as c:
        for step in (1, 2):
            c.save(step, small_state(step), {"position": step}, force=True)
    # a step directory without the commit marker (a partial copy, or a filesystem without atomic rename) ...
    shutil.copytree(directory / "2", directory / "5")
    (directory / "5" / "commit_success.txt").unlink()
    # ... one whose items were never all committed, and an unfinished save orbax left behind
    shutil.copytree(directory / "2", directory / "6")
    (directory / "6" / "state" / "commit_success.txt").unlink()
    shutil.copytree(directory / "2", directory / "7.orbax-checkpoint-tmp")
    assert ckpt.committed_steps(directory) == [1, 2]

    with ckpt.Checkpointer(tmp_path, run_config(), keep=2) as c:
        assert c.latest_step() == 2
        state, data_state = c.restore(small_state(0))
        assert int(state["step"]) == 2 and data_state == {"position": 2}
        # keep-last-N counts committed steps only: step 3 retires step 1, never the real step 2
        c.save(3, small_state(3), {"position": 3}, force=True)
        c.wait()
        assert c.all_steps() == [2, 3]
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3", "trash"]
    moved = sorted(p.name.split("-")[0] for p in (tmp_path / "incomplete").iterdir())
    assert moved == ["5", "6"]


CHILD = textwrap.dedent("""
    import asyncio, os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from v4jax.training import checkpoint as ckpt

    workdir, mode, run_config = sys.argv[1], sys.argv[2], {"model": {}, "train": {}}

    def state(step):
        big = jax.random.normal(jax.random.key(step), (4, 4 << 20))  # 64 MiB
        return {"big": big, "step": jnp.int32(step), "rng": jax.random.key_data(jax.random.key(step))}

    c = ckpt.Checkpointer(workdir, run_config, keep=3)
    c.save(1, state(1), {"position": 1}, force=True)
    c.wait()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):  # every byte written, the commit not yet made: the parent kills us here
        print("FINALIZING", flush=True)
        await asyncio.sleep(120)
        await finalize(self)

    if mode == "commit":
        atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    c.save(2, jax.block_until_ready(state(2)), {"position": 2}, force=True)
    print("SAVING", flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("mode", ["commit", "write"])
def test_sigkill_during_async_save_keeps_last_complete_step(tmp_path, mode):
    """commit: killed with every byte of step 2 written but not committed (deterministic).
    write: killed as soon as the async save starts, i.e. (almost always) while tensorstore is writing."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    workdir = tmp_path / "run"
    log = tmp_path / "child.log"
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, str(script), str(workdir), mode], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True)
    try:
        line, until = "", {"commit": "FINALIZING", "write": "SAVING"}[mode]
        for line in child.stdout:  # ends at the marker, or at EOF if the child dies first
            if line.strip() == until:
                break
        assert line.strip() == until, f"the child never got there:\n{log.read_text()[-3000:]}"
    finally:
        child.kill()  # SIGKILL: no cleanup, no atexit, the async save thread dies mid-flight
        child.wait()
    directory = workdir / "checkpoints"
    leftovers = [p.name for p in directory.iterdir()]
    assert "1" in leftovers
    if mode == "commit" or "2" not in leftovers:  # "write": a fast disk may have committed step 2 already
        assert "2" not in leftovers and any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers)
        expected = 1
    else:
        expected = 2

    with ckpt.Checkpointer(workdir, {"model": {}, "train": {}}) as c:
        assert c.latest_step() == expected
        abstract = {"big": jax.ShapeDtypeStruct((4, 4 << 20), jnp.float32),
                    "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        state, data_state = c.restore(abstract)
        assert int(state["step"]) == expected and data_state == {"position": expected}
        np.testing.assert_array_equal(state["rng"], jax.random.key_data(jax.random.key(expected)))
        want = jax.random.normal(jax.random.key(expected), (4, 4 << 20))
        assert float(state["big"][3, -1]) == float(want[3, -1]) and float(state["big"][0, 0]) == float(want[0, 0])
        assert not any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir())  # cleaned on start
        c.save(3, state, {"position": 3}, force=True)  # and the run goes on saving
        c.wait()
        assert c.all_steps() == [*range(1, expected + 1), 3]


# ---------------------------------------------------------------------------------------------------------------
# config compatibility


def test_config_compatibility(tmp_path):
    ckpt.Checkpointer(tmp_path, run_config(steps=100)).close()
    # training hyper-parameters and runtime choices may change on restart
    allowed = ckpt.check_compatible(tmp_path, RunConfig(
        model=dataclasses.replace(CFG, moe_impl="dense"), train=TrainConfig(steps=400, learning_rate=1e-3)).to_dict())
    assert set(allowed) == {"model.moe_impl", "train.steps", "train.learning_rate"}
    c = ckpt.Checkpointer(tmp_path, run_config(steps=400))
    assert c.config_changes == {"train.steps": (100, 400)}
    c.close()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 400
    # shapes may not
    wider = {**run_config(), "model": {**run_config()["model"], "hidden_size": 128, "n_routed_experts": 16}}
    with pytest.raises(ValueError, match=r"model\.hidden_size: 64 \(saved\) -> 128 \(now\)") as err:
        ckpt.Checkpointer(tmp_path, wider)
    assert "model.n_routed_experts" in str(err.value) and "train.steps" not in str(err.value)
    with pytest.raises(ValueError, match=r"train\.optimizer"):
        ckpt.check_compatible(tmp_path, run_config(optimizer="adamw"))
    # a field the saved config predates is compared against its default
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["hc_eps"], saved["train"]["z_loss_weight"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert ckpt.check_compatible(tmp_path, run_config(steps=400)) == {}


def test_restore_checks_the_checkpoint_config(tmp_path):
    with ckpt.Checkpointer(tmp_path, run_config()) as c:
        c.save(1, small_state(1), None, force=True)
    (tmp_path / "config.json").unlink()  # only the copy inside the checkpoint is left
    other = {**run_config(), "model": {**run_config()["model"], "num_hidden_layers": 3, "pattern": "WCH"}}
    with ckpt.Checkpointer(tmp_path, other) as c:
        with pytest.raises(ValueError, match=r"model\.num_hidden_layers"):
            c.restore(small_state(0))


# ---------------------------------------------------------------------------------------------------------------
# signals


def test_sigterm_sigint_set_the_stop_flag():
    ckpt.reset_stop()
    ckpt.install_signal_handlers()
    try:
        assert not ckpt.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode boundary
        assert ckpt.should_stop()
        ckpt.reset_stop()
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks for a clean stop
        time.sleep(0.01)
        assert ckpt.should_stop()
        with pytest.raises(KeyboardInterrupt):  # the second one interrupts
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        ckpt.uninstall_signal_handlers()
        ckpt.reset_stop()
    assert signal.getsignal(signal.SIGTERM) is not ckpt._handler
    assert signal.getsignal(signal.SIGINT) is not ckpt._handler
