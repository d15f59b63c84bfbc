"""Multi-host training on one machine: `python -m train.train --multihost` in two OS processes of 4 CPU devices each,
joined by `jax.distributed` (a localhost coordinator, gloo collectives), against one process of 8 devices running the
same command on the same data=2,expert=2,tensor=2 mesh:

* both processes exit 0; the train and eval losses equal the one-process run's to float rounding, so each process
  read its own block of every global batch and the blocks formed the same global batches;
* the workdir holds one committed checkpoint, written by both processes together, which one process restores and
  which equals the one-process run's checkpoint at that step;
* the two processes resume from it and continue like the uninterrupted one-process run;
* a mesh over only some of the devices is refused by every process (one line, exit 2).

One small model: tiny-v4 cut to a single window-attention MoE layer with the dense reference attention, one
residual stream and no MTP block (the whole tiny-v4 compiles for minutes on 8 CPU devices, and every run here compiles
its own step: JAX's persistent compilation cache keys differ between the processes of a multi-process run). The stdlib
corpus is prepared into a fresh cache by both processes at once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from v4jax.training import checkpoint, distributed, optimizer, overrides, step

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,expert=2,tensor=2"
SETTINGS = ["model.pattern=W", "model.first_hash_layers=0", "model.num_nextn_predict_layers=0",
            "model.attention_impl=reference", "model.hc_mult=1",
            "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "train.checkpoint_every=3",
            "train.eval_every=3", "train.eval_batches=1"]
FIRST, TOTAL = 3, 5  # steps of the first run, then of the resumed one (warm-up is 10 steps: the same schedule)
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, steps: int, env: dict, devices: int, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "train.train", "--config", "tiny_v4", "--workdir", str(workdir),
            "--steps", str(steps), "--mesh", MESH, *(a for s in SETTINGS for a in ("--set", s)), *extra]
    env = env | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def launch_pair(workdir: Path, steps: int, env: dict, *extra: str) -> list[subprocess.Popen]:
    """Two processes of 4 devices each, ids 0 and 1, joined through a fresh localhost port."""
    cluster = ["--multihost", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    return [launch(workdir, steps, env, 4, workdir.with_name(f"{workdir.name}-{steps}.{i}.log"), *extra, *cluster,
                   "--process-id", str(i)) for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output) of each process. One still running after TIMEOUT (stuck, or waiting on a dead peer) gets
    SIGABRT, so its log ends with every thread's Python stack (faulthandler), then is killed."""
    out, deadline = [], time.monotonic() + TIMEOUT
    for proc in procs:
        try:
            rc = proc.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                rc = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        out.append((rc, proc.log.read_text()))
    return out


def records(workdir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records) of metrics.jsonl by step; a step logged twice fails."""
    train, evals = {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        target = evals if "eval_loss" in record else train
        assert record["step"] not in target, f"step {record['step']} logged twice in {workdir}"
        target[record["step"]] = record
    return train, evals


def restore(workdir: Path, at: int):
    """The checkpoint of step `at` restored by this (one) process onto one device: (leaves by path, data state)."""
    run = overrides.apply(overrides.load_config("tiny_v4"), [*SETTINGS, f"train.steps={TOTAL}"])
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    with checkpoint.Checkpointer(workdir, run.to_dict()) as ckpt:
        state, data_state = ckpt.restore(step.abstract_state(run, opt), step=at)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}, data_state


def leftovers(workdir: Path) -> list[str]:
    """What a clean save leaves nothing of: orbax tmp directories, uncommitted steps moved aside."""
    odd = [p.name for p in (workdir / checkpoint.CHECKPOINT_DIR).iterdir() if checkpoint.TMP_SUFFIX in p.name]
    return odd + [checkpoint.INCOMPLETE_DIR] * (workdir / checkpoint.INCOMPLETE_DIR).exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1",
                        "V4JAX_CACHE": str(base / "data-cache")}
    out = types.SimpleNamespace(multi=base / "multi", single=base / "single", partial=base / "partial")
    out.first = finish(launch_pair(out.multi, FIRST, env))
    assert all(rc == 0 for rc, _ in out.first), "\n\n".join(log[-3000:] for _, log in out.first)
    out.committed_first = checkpoint.committed_steps(out.multi / checkpoint.CHECKPOINT_DIR)
    out.leftovers_first = leftovers(out.multi)
    out.first_records = records(out.multi)
    out.single_run = finish([launch(out.single, TOTAL, env, 8, base / "single.log")])[0]
    out.resumed = finish(launch_pair(out.multi, TOTAL, env))
    out.partial_run = finish(launch_pair(out.partial, FIRST, env, "--mesh", "data=2"))
    return out


def assert_close_records(got: dict[int, dict], want: dict[int, dict], steps, keys):
    for k in steps:
        for key in keys:
            np.testing.assert_allclose(got[k][key], want[k][key], rtol=1e-5, err_msg=f"step {k} {key}")


def test_two_processes_train_like_one(runs):
    rc, log = runs.single_run
    assert rc == 0, log[-3000:]
    train, evals = runs.first_records
    want, want_evals = records(runs.single)
    assert sorted(train) == list(range(1, FIRST + 1)) and sorted(evals) == [FIRST]  # process 0 logs, once
    assert_close_records(train, want, range(1, FIRST + 1), ("loss", "grad_norm"))
    # eval weighs batches by the global batch's token count, not by one process's rows
    assert evals[FIRST]["eval_tokens"] == want_evals[FIRST]["eval_tokens"]
    assert_close_records(evals, want_evals, [FIRST], ("eval_loss",))
    assert "trained to step 3" in runs.first[0][1] and "trained to step" not in runs.first[1][1]


def test_one_committed_checkpoint_that_one_process_restores(runs):
    assert runs.committed_first == [FIRST] and not runs.leftovers_first, (runs.committed_first, runs.leftovers_first)
    got, data_state = restore(runs.multi, FIRST)
    want, want_data = restore(runs.single, FIRST)
    assert data_state == want_data and data_state["step"] == FIRST
    assert got.keys() == want.keys() and int(got[".step"]) == FIRST
    for key in got:  # sharded sums in another order across processes: float rounding only
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_resume_continues_like_the_uninterrupted_run(runs):
    assert all(rc == 0 for rc, _ in runs.resumed), "\n\n".join(log[-3000:] for _, log in runs.resumed)
    assert f"resumed from step {FIRST}" in runs.resumed[0][1], runs.resumed[0][1][-3000:]
    train, evals = records(runs.multi)
    want, want_evals = records(runs.single)
    assert sorted(train) == list(range(1, TOTAL + 1)) and sorted(evals) == [FIRST, TOTAL]
    assert_close_records(train, want, range(FIRST + 1, TOTAL + 1), ("loss", "grad_norm"))
    assert_close_records(evals, want_evals, [TOTAL], ("eval_loss",))
    assert checkpoint.committed_steps(runs.multi / checkpoint.CHECKPOINT_DIR) == [FIRST, TOTAL]
    got, _ = restore(runs.multi, TOTAL)
    want_state, _ = restore(runs.single, TOTAL)
    for key in got:
        np.testing.assert_allclose(got[key], want_state[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_mesh_over_some_devices_is_refused_by_every_process(runs):
    for rc, log in runs.partial_run:
        error = log.strip().splitlines()[-1]
        assert rc == 2 and error.startswith("python -m train.train: error: "), log[-3000:]
        assert "the mesh has 2 devices but the 2 processes have 8" in error, error
    assert not runs.partial.exists()


class Held:
    """Stands in for a batch sharding: the row ranges this process's devices hold."""

    def __init__(self, *rows):
        self.rows = rows

    def addressable_devices_indices_map(self, shape):
        return {device: (slice(a, b), slice(None)) for device, (a, b) in enumerate(self.rows)}


@pytest.mark.parametrize("rows, slot", [
    (((0, 2), (2, 4)), (0, 2)),  # process 0 of 2
    (((6, 8), (4, 6)), (1, 2)),  # process 1 of 2, its devices listed in any order
    (((2, 4), (2, 4)), (1, 4)),  # a quarter, held twice (tensor-parallel devices)
    (((None, None),), (0, 1)),  # the batch replicated: every process reads it all
])
def test_batch_slot_is_the_block_of_rows_the_process_holds(rows, slot):
    assert distributed.batch_slot(Held(*rows), (8, 32)) == slot


def test_batch_slot_refuses_rows_that_are_not_one_block():
    with pytest.raises(ValueError, match="not one contiguous block"):
        distributed.batch_slot(Held((0, 2), (4, 6)), (8, 32))
    with pytest.raises(ValueError, match="not one contiguous block"):
        distributed.batch_slot(Held((2, 5)), (8, 32))


def test_one_process_reads_and_places_the_whole_batch():
    from v4jax import sharding

    mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
    batch_sharding = step.batch_sharding(mesh)
    assert distributed.batch_slot(batch_sharding, (8, 32)) == (0, 1)
    local = {"tokens": np.arange(8 * 32).reshape(8, 32)}
    placed = distributed.global_batch(local, batch_sharding, 8)["tokens"]
    assert placed.sharding == batch_sharding and placed.dtype == np.int32
    np.testing.assert_array_equal(distributed.fetch(placed), local["tokens"])
