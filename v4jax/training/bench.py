"""Training benchmark: a run's jitted train step, timed; step time, tokens/s and MFU.

    python -m train.bench train --config bench_cpu [--steps 5] [--warmup 1] [--set key=value ...]

What is timed: `step.jit_train_step` (forward, backward, optimizer update, router bias update) on batches that were
built and put on the device beforehand, one `block_until_ready` per step; the median over the timed steps is the
step time. The first `warmup` steps (after the compile) are not timed.

MFU = model FLOPs per step / step seconds / peak FLOP/s, with the helpers of `metrics.py`:
`train_flops_per_step(run)` is 3 x cost.py's forward FLOPs per token x tokens per step (matmuls only; routed experts
at top-k, i.e. active parameters; causal attention; the MTP block, capacity padding, remat recompute and the
optimizer's own arithmetic, e.g. Muon's Newton-Schulz iterations, not counted), and `total_peak_flops()` is on CPU
the float32 matmul rate measured in this process (`measure_cpu_matmul_peak`, all host cores), taken right before and
again right after the timed steps, the higher of the two kept (on a shared machine a busy moment would otherwise
lower the peak and flatter the MFU); on TPU/GPU the chips' bf16 datasheet peak.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from v4jax.training import data, metrics, optimizer, step
from v4jax.training.config import RunConfig

CPU_SHARE = "this process's CPU seconds per wall second and core during the steps; below 1: a shared machine"


def train(run: RunConfig, *, steps: int = 5, warmup: int = 1, mesh=None, name: str = "",
          dataset: data.DataIterator | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Time `steps` train steps of `run` after `warmup` untimed ones; returns the figures as a dict.

    `dataset`: the run's batches (default `data.make_dataset` of the run)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    say = progress or (lambda _: None)
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    dataset = data.make_dataset(run.train, run.model.vocab_size) if dataset is None else dataset
    sharding = None if mesh is None else step.batch_sharding(mesh)
    batches = [jax.device_put({k: np.asarray(v, np.int32) for k, v in next(dataset).items()}, sharding)
               for _ in range(warmup + steps)]
    state = step.init_state(run, opt, jax.random.key(run.train.seed), mesh=mesh)
    say(f"compiling the train step of {name or run.model.name} ...")
    start = time.perf_counter()
    compiled = step.jit_train_step(run, opt, state, mesh).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    for batch in batches[:warmup]:
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
    say(f"compiled in {compile_s:.1f} s; measuring the peak ...")
    peak = metrics.total_peak_flops()
    times, losses = [], []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for k, batch in enumerate(batches[warmup:]):
        start = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - start)
        losses.append(float(m["loss"]))
        say(f"step {k + 1}/{steps}: {times[-1]:.3f} s, loss {losses[-1]:.4f}")
    cpu_share = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start) / (os.cpu_count() or 1)
    peaks = [peak]
    if peak and jax.devices()[0].platform == "cpu":
        # measured again after the steps, the better of the two kept: a busy moment during one measurement must not
        # lower the peak and so flatter the MFU
        peaks.append(metrics.measure_cpu_matmul_peak())
        peak = max(peaks)
    step_s = statistics.median(times)
    tokens = run.train.batch_size * run.train.seq_len
    flops = metrics.train_flops_per_step(run)
    device = jax.devices()[0]
    return {
        "config": name or run.model.name, "model": run.model.summary(), "optimizer": run.train.optimizer.value,
        "compute_dtype": run.train.compute_dtype, "batch_size": run.train.batch_size, "seq_len": run.train.seq_len,
        "tokens_per_step": tokens, "steps": steps, "warmup": warmup, "compile_s": compile_s,
        "step_times_s": times, "step_time_s": step_s, "tokens_per_s": tokens / step_s,
        "flops_per_step": flops, "peak_flops": peak, "peak_measurements": peaks,
        "peak_source": ("float32 1024^3 matmul measured in this run, best of before and after the steps"
                        if device.platform == "cpu"
                        else f"bf16 datasheet peak of {device.device_kind}"),
        "mfu": flops / step_s / peak if peak else None,
        "devices": f"{len(jax.devices())} x {device.device_kind}" + (f", mesh {dict(mesh.shape)}" if mesh else ""),
        "cpu_cores": os.cpu_count(), "cpu_share": cpu_share, "losses": losses,
    }


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def text(result: dict) -> str:
    """The benchmark's printout: what ran, then one line per figure."""
    mfu = "unknown (no peak for this device)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    times = ", ".join(f"{t:.3f}" for t in result["step_times_s"])
    setup = (f"optimizer {result['optimizer']}, compute {result['compute_dtype']}, batch {result['batch_size']} x "
             f"{result['seq_len']} = {result['tokens_per_step']:,} tokens/step, {result['devices']}")
    step_time = (f"{result['step_time_s']:.3f} s (median of {result['steps']} after {result['warmup']} warm-up: "
                 f"{times})")
    return "\n".join([
        f"train bench: {result['config']}: {result['model']}",
        setup,
        f"compile      {result['compile_s']:.1f} s",
        f"step time    {step_time}",
        f"tokens/s     {result['tokens_per_s']:,.0f}",
        f"model FLOPs  {_si(result['flops_per_step'], 'FLOP')}/step (3 x forward, cost.py)",
        f"peak         {_si(result['peak_flops'] or 0, 'FLOP/s')} ({result['peak_source']})",
        f"MFU          {mfu}",
        f"CPU share    {result['cpu_share']:.2f} of {result['cpu_cores']} cores ({CPU_SHARE})",
    ])
