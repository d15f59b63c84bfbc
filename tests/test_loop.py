"""The training loop end to end, through `python -m train.train` subprocesses sharing one tiny run:

* resume after SIGKILL in the middle of a run == the uninterrupted run, bit for bit (final loss, every parameter,
  router bias, optimizer moment, step and rng);
* a checkpoint written on one device, resumed on a data=2,expert=2,tensor=2 mesh, continues to the same result
  within float tolerance;
* a NaN/Inf loss stops the run with its step number (one-line error, exit code 2), and the last good checkpoint
  stays intact (bit-identical to the uninterrupted run's at that step) and loadable.

Five runs of one 2-layer MoE model (no MTP block, which would double the compile time): the uninterrupted run
compiles the step into a persistent compilation cache that the killed and the resumed runs reuse; the mesh and
the diverging runs (each its own program) compile side by side.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from v4jax.training import checkpoint, optimizer, overrides, step

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
EVERY = 3
SETTINGS = ["model.num_hidden_layers=2", "model.pattern=MM", "model.first_dense_layers=0", "model.vocab_size=64",
            "model.num_nextn_predict_layers=0", "train.data=synthetic:counting:16", "train.seq_len=16", "train.batch_size=8", "train.warmup_steps=3",
            f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=0", "train.log_every=1"]
TIMEOUT = 600


def run_config(extra=()):
    return overrides.apply(overrides.load_config("tiny_v3"), [*SETTINGS, f"train.steps={STEPS}", *extra])


def launch(workdir: Path, env: dict, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "train.train", "--config", "tiny_v3", "--workdir", str(workdir),
            "--steps", str(STEPS), *(a for s in SETTINGS for a in ("--set", s)), *extra]
    with open(workdir.with_suffix(".log"), "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    rc = proc.wait(TIMEOUT)
    path = Path(proc.args[proc.args.index("--workdir") + 1]).with_suffix(".log")
    return rc, path.read_text()


def committed(workdir: Path) -> list[int]:
    return checkpoint.committed_steps(workdir / checkpoint.CHECKPOINT_DIR)


def last_record(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


def restore(workdir: Path, at: int | None = None):
    run = run_config()
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    with checkpoint.Checkpointer(workdir, run.to_dict()) as ckpt:
        state, data_state = ckpt.restore(step.abstract_state(run, opt), step=at)
    return state, data_state


def leaves(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("loop")
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(ROOT)}
    ref, killed, mesh, nan = (base / name for name in ("ref", "killed", "mesh", "nan"))
    for d in (ref, killed):
        d.mkdir()
    rc, ref_log = finish(launch(ref, env))
    assert rc == 0, ref_log[-3000:]
    victim = launch(killed, env)
    deadline = time.monotonic() + TIMEOUT
    while not committed(killed) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    killed_log = killed.with_suffix(".log").read_text()
    assert alive, f"the run ended before it could be killed:\n{killed_log[-2000:]}"
    killed_at = committed(killed)
    assert killed_at and killed_at[-1] < STEPS, (killed_at, killed_log[-2000:])
    shutil.copytree(killed, mesh)  # the killed run's workdir, before it is resumed, for the other two runs
    shutil.copytree(killed, nan)
    rc, resume_log = finish(launch(killed, env))
    assert rc == 0 and f"resumed from step {killed_at[-1]}" in resume_log, resume_log[-3000:]
    on_mesh = launch(mesh, env, "--mesh", "data=2,expert=2,tensor=2")
    diverging = launch(nan, env, "--set", "train.learning_rate=1e30")
    mesh_rc, mesh_log = finish(on_mesh)
    nan_rc, nan_log = finish(diverging)
    return types.SimpleNamespace(ref=ref, killed=killed, mesh=mesh, nan=nan, killed_at=killed_at[-1],
                                 mesh_rc=mesh_rc, mesh_log=mesh_log, nan_rc=nan_rc, nan_log=nan_log)


def test_resume_after_sigkill_is_bit_exact(runs):
    ref, resumed = last_record(runs.ref), last_record(runs.killed)
    assert ref["step"] == resumed["step"] == STEPS
    assert resumed["loss"] == ref["loss"] and resumed["grad_norm"] == ref["grad_norm"]
    assert committed(runs.ref)[-1] == committed(runs.killed)[-1] == STEPS
    (a, data_a), (b, data_b) = restore(runs.ref), restore(runs.killed)
    assert data_a == data_b and int(b.step) == STEPS
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys() and any("router" in k and "bias" in k for k in a)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different
    # the killed run really lost work: it stopped between checkpoints and replayed steps after the restart
    steps = [json.loads(line)["step"] for line in (runs.killed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1)) and runs.killed_at < STEPS


def test_resume_onto_another_mesh(runs):
    """A checkpoint written on one device, resumed on an 8-device mesh: the parameters equal the single-device
    run's to float rounding only, since sharded matmuls and all-reduces sum in another order (measured: at most
    2e-6 absolute, 2e-5 of the largest element, after 27 steps of Muon), the loss to 1e-5 relative."""
    assert runs.mesh_rc == 0 and f"resumed from step {runs.killed_at}" in runs.mesh_log, runs.mesh_log[-3000:]
    ref, moved = last_record(runs.ref), last_record(runs.mesh)
    assert moved["step"] == STEPS
    np.testing.assert_allclose(moved["loss"], ref["loss"], rtol=1e-5)
    a, b = leaves(restore(runs.ref)[0]), leaves(restore(runs.mesh)[0])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(runs):
    error = runs.nan_log.strip().splitlines()[-1]
    assert runs.nan_rc == 2 and error.startswith("python -m train.train: error: "), runs.nan_log[-3000:]
    bad = int(error.split(" at step ")[1].split(":")[0])
    latest = committed(runs.nan)[-1]
    assert "training diverged" in error and f"the last checkpoint (step {latest}) is kept" in error, error
    assert runs.killed_at <= latest < bad, (runs.killed_at, latest, bad)
    # nothing from the diverged steps was saved: the last checkpoint equals the uninterrupted run's at that step
    kept, data_state = restore(runs.nan)
    assert int(kept.step) == latest and data_state["step"] == latest
    kept, same = leaves(kept), leaves(restore(runs.ref, at=latest)[0])
    assert all(np.isfinite(v).all() for v in kept.values() if v.dtype.kind == "f")
    assert not [k for k in kept if not np.array_equal(kept[k], same[k])]
