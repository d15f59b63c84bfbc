"""The training loop: resume or start, step, log, checkpoint, stop cleanly.

Everything the loop does is a call into the other training modules; `train/train.py` only parses arguments.
The data pipeline is opened (and validated) before anything is written to the workdir, so bad data leaves no trace.

Divergence: every step's loss and gradient norm are watched on the device (no host sync); the first step where
either is NaN/Inf is remembered, and the loop checks it at each log step and before each checkpoint save. A
diverged run stops with that step number and saves nothing from then on, so the latest checkpoint is the last one
whose steps all had a finite loss and gradient. SIGTERM / SIGINT save a checkpoint at the current step and return.

Periodic eval (`train.eval_every` > 0): every `eval_every` steps and at the last one, the first `eval_batches`
batches of the held-out split (`data.make_dataset(split="eval")`, opened with the train data before anything is
written) are evaluated and logged as `eval_loss` (`eval_mtp_loss`, `eval_tokens`). The batches are read by index, so
every eval sees the same ones and its result is a function of the parameters alone; it reads the state without
changing it and never touches the train data iterator, so training is the same with eval on or off.

Several processes (`distributed.initialize`, one per host, all running the same command, the mesh over every
device): each process reads only the rows of each global batch its devices hold (`distributed.batch_slot`: block p
of P for process p of P when the batch is split over all processes) and the global batch is assembled from those
blocks, so the run trains on the same batches, and to float rounding the same numbers, as one process on the same
mesh. Metrics and eval token counts are taken from the global arrays; checkpoints are saved and restored by all
processes together. Every process compiles the steps before the first one and waits for the others, so no process
waits inside a collective while another compiles. A stop request (SIGTERM / SIGINT, which may reach only some processes) is acted on at the next
log or checkpoint step, where every process learns whether any got one, so all save the same step and stop.

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
from v4jax.training import checkpoint, data, distributed, metrics, optimizer, step
from v4jax.training.config import RunConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step."""


@dataclasses.dataclass
class Result:
    step: int
    loss: float
    resumed_from: int | None


def make_dataset(run: RunConfig, mesh=None) -> data.DataIterator:
    """The run's training batches, this process's rows of each (`distributed.batch_slot` on `mesh`); raises
    ValueError / OSError (one line each) for a bad `train.data`."""
    return data.make_dataset(run.train, run.model.vocab_size, *_slot(run, mesh))


def make_eval_dataset(run: RunConfig, mesh=None) -> data.DataIterator | None:
    """The held-out batches of `train.data` that periodic eval reads; None when `train.eval_every` is 0. Raises
    ValueError for a negative `eval_every` or an `eval_batches` < 1, ValueError / OSError for bad data."""
    if not _eval_on(run):
        return None
    return data.make_dataset(run.train, run.model.vocab_size, *_slot(run, mesh), split="eval")


def _slot(run: RunConfig, mesh) -> tuple[int, int]:
    """(index, count) of the block of each global batch this process reads."""
    sharding = None if mesh is None else step.batch_sharding(mesh)
    return distributed.batch_slot(sharding, (run.train.batch_size, run.train.seq_len))


def _eval_on(run: RunConfig) -> bool:
    """Whether periodic eval runs; raises ValueError for settings it cannot run with."""
    every, count = run.train.eval_every, run.train.eval_batches
    if every < 0:
        raise ValueError(f"TrainConfig.eval_every: must be >= 0 (0: no eval), got {every}")
    if every and count < 1:
        raise ValueError(f"TrainConfig.eval_batches: must be >= 1 when eval_every > 0, got {count}")
    return every > 0


def train(run: RunConfig, workdir: str | Path, mesh=None, *, progress: bool = True,
          dataset: data.DataIterator | None = None, eval_dataset: data.DataIterator | None = None) -> Result:
    """Train `run` in `workdir` (resuming from its latest checkpoint), on `mesh` (None: one device).

    `dataset` defaults to `make_dataset(run, mesh)` and `eval_dataset` to `make_eval_dataset(run, mesh)` (used only
    when `train.eval_every` > 0), both opened before anything is written. Raises TrainingDiverged; ValueError for
    several processes without a mesh over all their devices, or a dataset reading other rows than this process's.
    """
    workdir = Path(workdir)
    distributed.check_mesh(mesh)
    dataset = make_dataset(run, mesh) if dataset is None else dataset
    if eval_dataset is None or not _eval_on(run):
        eval_dataset = make_eval_dataset(run, mesh)
    slot = _slot(run, mesh)
    for it in (dataset, eval_dataset):
        if it is not None and (it.process_index, it.process_count) != slot:
            raise ValueError(f"{it!r} reads block {it.process_index} of {it.process_count} of each batch but "
                             f"this process holds block {slot[0]} of {slot[1]}")
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    ckpt = checkpoint.Checkpointer(workdir, run.to_dict())
    resumed_from = ckpt.latest_step()
    if resumed_from is None:
        state = step.init_state(run, opt, jax.random.key(run.train.seed), mesh=mesh)
    else:
        state, data_state = ckpt.restore(step.abstract_state(run, opt, mesh))
        dataset.restore(data_state)
    train_step = step.jit_train_step(run, opt, state, mesh)
    evaluator = None if eval_dataset is None else Evaluator(run, eval_dataset, state, mesh)
    _compile_together(run, state, mesh, train_step, evaluator)
    logger = metrics.MetricsLogger(workdir, run.train.steps, metrics.train_flops_per_step(run),
                                   metrics.total_peak_flops(), progress=progress,
                                   layer_names=metrics.moe_layer_names(run.model))
    if resumed_from is not None:
        logger.note(f"resumed from step {resumed_from} in {workdir}")
    checkpoint.install_signal_handlers()
    loss = math.nan
    try:
        loss = _run_steps(run, state, dataset, train_step, ckpt, logger, mesh, evaluator)
    finally:
        ckpt.wait()
        ckpt.close()
        logger.close()
        checkpoint.uninstall_signal_handlers()
    return Result(step=ckpt.latest_step() or 0, loss=loss, resumed_from=resumed_from)


def _compile_together(run: RunConfig, state, mesh, train_step, evaluator) -> None:
    """Several processes: compile the train (and eval) step now, then wait for all, so that the first step's
    collectives start together. Each process compiles on its own, at its own speed; without the wait the fastest
    enters the first collective alone, and on CPU gloo gives up on a reduce-scatter after 30 s whatever the timeout
    flags say (jax-ml/jax#40831). The first calls reuse these compilations (jit's cache)."""
    if jax.process_count() == 1:
        return
    batch = {name: jax.ShapeDtypeStruct((run.train.batch_size, run.train.seq_len), jnp.int32,
                                        sharding=step.batch_sharding(mesh)) for name in data.BATCH_KEYS}
    train_step.lower(state, batch).compile()
    if evaluator is not None:
        evaluator.eval_step.lower(state, batch).compile()
    distributed.barrier("v4jax_steps_compiled")


@jax.jit
def _watch(first: dict, done, loss, grad_norm) -> dict:
    """Remember the first step whose loss or gradient norm is not finite (step 0: none yet)."""
    new = (first["step"] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return {"step": jnp.where(new, done, first["step"]), "loss": jnp.where(new, loss, first["loss"]),
            "grad_norm": jnp.where(new, grad_norm, first["grad_norm"])}


def _check_finite(first: dict, ckpt) -> None:
    first = distributed.fetch(first)  # a host sync: only at log steps and before saves
    bad = int(first["step"])
    if bad:
        ckpt.wait()  # an earlier (good) save still in flight becomes the latest committed one
        loss, grad_norm = float(first["loss"]), float(first["grad_norm"])
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss})"
        latest = ckpt.latest_step()
        kept = "no checkpoint was written" if latest is None else f"the last checkpoint (step {latest}) is kept"
        raise TrainingDiverged(f"{what} at step {bad}: training diverged, stopped; {kept}")


# The denominators of eval_step's per-batch means, counted exactly (integers) from the batch's loss mask the way
# `step.losses` forms them: tokens for the loss and z-loss, in-document pairs for the MTP loss (which `summarize`
# does not return).
def _eval_weights(loss_mask: np.ndarray) -> dict[str, int]:
    mask = np.asarray(loss_mask, np.int64)
    tokens = int(mask.sum())
    return {"loss": tokens, "z_loss": tokens, "mtp_loss": int((mask[:, :-1] * mask[:, 1:]).sum())}


def average_eval(per_batch: list[dict], loss_masks: list[np.ndarray]) -> dict[str, float | int]:
    """Token-weighted means of eval_step's per-batch means: sum(mean_i * tokens_i) / sum(tokens_i), in float64,
    which is the mean over every evaluated token (the MTP loss over its own pair count); plus `tokens`, the total.
    A batch without tokens weighs nothing; no tokens at all gives 0, as `step.summarize` does."""
    weights = [_eval_weights(mask) for mask in loss_masks]
    out: dict[str, float | int] = {}
    for name in ("loss", "mtp_loss", "z_loss"):
        if name in per_batch[0]:
            total = sum(w[name] for w in weights)
            out[name] = sum(float(m[name]) * w[name] for m, w in zip(per_batch, weights)) / max(total, 1)
    return out | {"tokens": sum(w["loss"] for w in weights)}


class Evaluator:
    """Periodic eval on the first `train.eval_batches` batches of `dataset` (read by index: the same ones each
    time), with `step.jit_eval_step` on `mesh`."""

    def __init__(self, run: RunConfig, dataset: data.DataIterator, state: step.TrainState, mesh=None):
        self.every, self.count, self.dataset = run.train.eval_every, run.train.eval_batches, dataset
        self.batch_size = run.train.batch_size
        self.eval_step = step.jit_eval_step(run, state, mesh)
        self.sharding = None if mesh is None else step.batch_sharding(mesh)

    def due(self, done: int, final: bool) -> bool:
        return done % self.every == 0 or final

    def __call__(self, state: step.TrainState) -> dict[str, float | int]:
        batches = [distributed.global_batch(self.dataset.batch(i), self.sharding, self.batch_size)
                   for i in range(self.count)]
        # all batches dispatched, then one fetch; the fetch also finishes every read of `state` before the next
        # train step donates it. The token weights come from the global masks: a process holds only its rows.
        per_batch, masks = distributed.fetch(([self.eval_step(state, b) for b in batches],
                                              [b["loss_mask"] for b in batches]))
        return average_eval(per_batch, masks)


def _run_steps(run, state, dataset, train_step, ckpt, logger, mesh, evaluator=None) -> float:
    sharding = None if mesh is None else step.batch_sharding(mesh)
    loss, last = math.nan, time.perf_counter()
    first_bad = {"step": jnp.zeros((), jnp.int32), "loss": jnp.zeros((), jnp.float32),
                 "grad_norm": jnp.zeros((), jnp.float32)}
    for k in range(int(state.step), run.train.steps):
        batch = distributed.global_batch(next(dataset), sharding, run.train.batch_size)
        state, m = train_step(state, batch)
        done = k + 1
        first_bad = _watch(first_bad, np.int32(done), m["loss"], m["grad_norm"])
        final = done == run.train.steps
        stop = _stop_requested(done % run.train.log_every == 0 or final or ckpt.should_save(done))
        if done % run.train.log_every == 0 or final:
            _check_finite(first_bad, ckpt)
            host = distributed.fetch(m)
            loss = float(host["loss"])
            now = time.perf_counter()
            logger.log(done, host, tokens=run.train.batch_size * run.train.seq_len,
                       step_time=(now - last) / run.train.log_every)
            last = now
        if evaluator is not None and evaluator.due(done, final):
            _check_finite(first_bad, ckpt)  # a diverged run stops before evaluating a non-finite state
            start = time.perf_counter()
            logger.log_eval(done, evaluator(state))
            last += time.perf_counter() - start  # the logged train step time leaves the eval out
        if stop or final or ckpt.should_save(done):
            _check_finite(first_bad, ckpt)  # never save a state that a non-finite step produced
            ckpt.save(done, state, dataset.state(), force=stop or final)
        if stop:
            logger.note(f"stop requested: saved step {done}")
            break
    return loss


def _stop_requested(sync_point: bool) -> bool:
    """Whether to save and stop after this step. One process: as soon as a signal arrived. Several: only at
    `sync_point` steps (log / checkpoint steps, the same on every process), and then on every process if any got
    one; a process stopping alone would leave the others waiting in the next step's collectives."""
    if jax.process_count() == 1:
        return checkpoint.should_stop()
    return sync_point and distributed.any_process(checkpoint.should_stop())


def cost_table(run: RunConfig) -> str:
    return str(cost.report(run.model, context=run.train.seq_len))
