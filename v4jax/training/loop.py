"""The training loop: resume or start, step, log, checkpoint, stop cleanly.

Everything the loop does is a call into the other training modules; `train/train.py` only parses arguments.
The data pipeline is opened (and validated) before anything is written to the workdir, so bad data leaves no trace.

Divergence: every step's loss and gradient norm are watched on the device (no host sync); the first step where
either is NaN/Inf is remembered, and the loop checks it at each log step and before each checkpoint save. A
diverged run stops with that step number and saves nothing from then on, so the latest checkpoint is the last one
whose steps all had a finite loss and gradient. SIGTERM / SIGINT save a checkpoint at the current step and return.

Resuming is exact: the checkpoint holds the whole train state (parameters, router biases, optimizer moments and
counts, step, rng) and the data position, and batch k is a pure function of the step, so a run killed at any point
and restarted with the same workdir reproduces the uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import cost
from v4jax.training import checkpoint, data, metrics, optimizer, step
from v4jax.training.config import RunConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step."""


@dataclasses.dataclass
class Result:
    step: int
    loss: float
    resumed_from: int | None


def make_dataset(run: RunConfig) -> data.DataIterator:
    """The run's training batches; raises ValueError / OSError (one line each) for a bad `train.data`."""
    return data.make_dataset(run.train, run.model.vocab_size)


def train(run: RunConfig, workdir: str | Path, mesh=None, *, progress: bool = True,
          dataset: data.DataIterator | None = None) -> Result:
    """Train `run` in `workdir` (resuming from its latest checkpoint), on `mesh` (None: one device).

    `dataset` defaults to `make_dataset(run)`, opened before anything is written. Raises TrainingDiverged.
    """
    workdir = Path(workdir)
    dataset = make_dataset(run) if dataset is None else dataset
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    ckpt = checkpoint.Checkpointer(workdir, run.to_dict())
    resumed_from = ckpt.latest_step()
    if resumed_from is None:
        state = step.init_state(run, opt, jax.random.key(run.train.seed), mesh=mesh)
    else:
        state, data_state = ckpt.restore(step.abstract_state(run, opt, mesh))
        dataset.restore(data_state)
    train_step = step.jit_train_step(run, opt, state, mesh)
    logger = metrics.MetricsLogger(workdir, run.train.steps, metrics.train_flops_per_step(run),
                                   metrics.total_peak_flops(), progress=progress,
                                   layer_names=metrics.moe_layer_names(run.model))
    if resumed_from is not None:
        logger.note(f"resumed from step {resumed_from} in {workdir}")
    checkpoint.install_signal_handlers()
    loss = math.nan
    try:
        loss = _run_steps(run, state, dataset, train_step, ckpt, logger, mesh)
    finally:
        ckpt.wait()
        ckpt.close()
        logger.close()
        checkpoint.uninstall_signal_handlers()
    return Result(step=ckpt.latest_step() or 0, loss=loss, resumed_from=resumed_from)


@jax.jit
def _watch(first: dict, done, loss, grad_norm) -> dict:
    """Remember the first step whose loss or gradient norm is not finite (step 0: none yet)."""
    new = (first["step"] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return {"step": jnp.where(new, done, first["step"]), "loss": jnp.where(new, loss, first["loss"]),
            "grad_norm": jnp.where(new, grad_norm, first["grad_norm"])}


def _check_finite(first: dict, ckpt) -> None:
    bad = int(first["step"])  # a host sync: only at log steps and before saves
    if bad:
        ckpt.wait()  # an earlier (good) save still in flight becomes the latest committed one
        loss, grad_norm = float(first["loss"]), float(first["grad_norm"])
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss})"
        latest = ckpt.latest_step()
        kept = "no checkpoint was written" if latest is None else f"the last checkpoint (step {latest}) is kept"
        raise TrainingDiverged(f"{what} at step {bad}: training diverged, stopped; {kept}")


def _run_steps(run, state, dataset, train_step, ckpt, logger, mesh) -> float:
    sharding = None if mesh is None else step.batch_sharding(mesh)
    loss, last = math.nan, time.perf_counter()
    first_bad = {"step": jnp.zeros((), jnp.int32), "loss": jnp.zeros((), jnp.float32),
                 "grad_norm": jnp.zeros((), jnp.float32)}
    for k in range(int(state.step), run.train.steps):
        batch = jax.device_put({name: np.asarray(v, np.int32) for name, v in next(dataset).items()}, sharding)
        state, m = train_step(state, batch)
        done = k + 1
        first_bad = _watch(first_bad, np.int32(done), m["loss"], m["grad_norm"])
        stop = checkpoint.should_stop()
        final = done == run.train.steps
        if done % run.train.log_every == 0 or final:
            _check_finite(first_bad, ckpt)
            loss = float(m["loss"])
            now = time.perf_counter()
            logger.log(done, m, tokens=run.train.batch_size * run.train.seq_len,
                       step_time=(now - last) / run.train.log_every)
            last = now
        if stop or final or ckpt.should_save(done):
            _check_finite(first_bad, ckpt)  # never save a state that a non-finite step produced
            ckpt.save(done, state, dataset.state(), force=stop or final)
        if stop:
            logger.note(f"stop requested: saved step {done}")
            break
    return loss


def cost_table(run: RunConfig) -> str:
    return str(cost.report(run.model, context=run.train.seq_len))
