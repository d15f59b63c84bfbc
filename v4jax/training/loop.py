"""The training loop: resume or start, step, log, checkpoint, stop cleanly.

Everything the loop does is a call into the other training modules; `train/train.py` only parses arguments.
A non-finite loss stops the run with its step number and saves nothing, so the last good checkpoint stays the
latest. SIGTERM / SIGINT save a checkpoint at the current step and return.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
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


def train(run: RunConfig, workdir: str | Path, mesh=None, *, progress: bool = True) -> Result:
    workdir = Path(workdir)
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    ckpt = checkpoint.Checkpointer(workdir, run.to_dict())
    dataset = data.make_dataset(run.train, run.model.vocab_size)
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


def _run_steps(run, state, dataset, train_step, ckpt, logger, mesh) -> float:
    sharding = None if mesh is None else step.batch_sharding(mesh)
    loss, last = math.nan, time.perf_counter()
    for k in range(int(state.step), run.train.steps):
        batch = jax.device_put({name: np.asarray(v, np.int32) for name, v in next(dataset).items()}, sharding)
        state, m = train_step(state, batch)
        done = k + 1
        if done % run.train.log_every == 0 or done == run.train.steps:
            loss = float(m["loss"])  # the only host sync, once per log interval
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at step {done}; the last checkpoint "
                                       f"(step {ckpt.latest_step()}) is kept")
            now = time.perf_counter()
            logger.log(done, m, tokens=run.train.batch_size * run.train.seq_len,
                       step_time=(now - last) / run.train.log_every)
            last = now
        stop = checkpoint.should_stop()
        ckpt.save(done, state, dataset.state(), force=stop or done == run.train.steps)
        if stop:
            logger.note(f"stop requested: saved step {done}")
            break
    return loss


def cost_table(run: RunConfig) -> str:
    return str(cost.report(run.model, context=run.train.seq_len))
