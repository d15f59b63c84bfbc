"""Where a train step's time goes, and whether a change made it faster.

    python -m train.bench profile --config bench_tiny_v4 --out DIR [--depth 3] [--set key=value ...]
    python -m train.bench compare --config bench_tiny_v4 --a "train.loss_chunk=0" --b "" [--steps 3]

`profile_train_step` compiles a run's train step, runs it once untraced (warm-up) and once under `jax.profiler`
(a Perfetto trace under DIR/trace, viewable in ui.perfetto.dev or TensorBoard), and sums the trace's XLA op events
per `jax.named_scope`: each op event is named after its HLO instruction, whose metadata holds the scope path it
was traced under (`model/scanned_unit/attention/v4_kernel/...`). Autodiff wrappers are stripped from the path and
recorded instead as the direction: `transpose(...)` marks backward-pass ops. Ops inside loops are counted once per
iteration; loop and call instructions themselves are not counted (their bodies are). On XLA:CPU every op event
is a thunk on the host; the figures are wall time per op, so ops running side by side on several cores overlap.

`compare` times train-step variants of one run interleaved, step by step, in one process: on a shared machine the
ratio of two medians taken side by side is what survives the noise.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from v4jax.bench import Progress, _say
from v4jax.training import data, optimizer, step
from v4jax.training.config import RunConfig

_CONTAINERS = (" while(", " conditional(", " call(")  # ops whose time is their bodies' (counted there)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WRAPPER = re.compile(r"(?:jvp|transpose|vmap|remat|checkpoint|pjit|jit)\(([^()]*)\)")
_NOISE = ("while/body/", "while/cond/", "closed_call/", "cond/branch_0_fun/", "cond/branch_1_fun/")


@dataclasses.dataclass
class Prepared:
    """A compiled train step with a state and a batch to run it on."""

    run: RunConfig
    compiled: object
    state: object
    batch: dict
    compile_s: float
    loss: float = float("nan")  # the last step's

    def step(self) -> float:
        """One step (the state advances); its wall seconds."""
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss"])
        return time.perf_counter() - start


def prepare(run: RunConfig, progress: Progress = None, name: str = "") -> Prepared:
    """Compile `run`'s train step (timed) and run it once (warm-up: first-call allocations are not measured)."""
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    batch = next(data.make_dataset(run.train, run.model.vocab_size))
    batch = jax.device_put({k: np.asarray(v, np.int32) for k, v in batch.items()})
    state = step.init_state(run, opt, jax.random.key(run.train.seed))
    _say(progress, f"compiling the train step of {name or run.model.name} ...")
    start = time.perf_counter()
    compiled = step.jit_train_step(run, opt, state, None).lower(state, batch).compile()
    prepared = Prepared(run, compiled, state, batch, time.perf_counter() - start)
    prepared.step()
    return prepared


# ---------------------------------------------------------------------------------------------------------------
# the trace, summed per scope


def op_scopes(hlo_text: str) -> tuple[dict[str, str], set[str]]:
    """HLO instruction name -> its op_name metadata (the traced scope path), and the loop/call instructions."""
    scopes, containers = {}, set()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        op_name = _OP_NAME.search(rest)
        scopes[name] = op_name.group(1) if op_name else ""
        if any(c in rest for c in _CONTAINERS):
            containers.add(name)
    return scopes, containers


def scope_key(op_name: str, depth: int) -> tuple[str, bool]:
    """An op_name -> (its first `depth` scope levels, without autodiff wrappers and loop plumbing; backward?)."""
    backward = "transpose(" in op_name
    path = re.sub(r"^jit\([^()]*\)/", "", op_name)  # the step's own jit(train_step)
    while True:  # unwrap innermost-first: "transpose(jvp(scanned_unit))" -> "scanned_unit"
        unwrapped = _WRAPPER.sub(r"\1", path)
        if unwrapped == path:
            break
        path = unwrapped
    for noise in _NOISE:
        path = path.replace(noise, "")
    parts = [p for p in path.split("/") if p]
    return "/".join(parts[:depth]) or "(no scope)", backward


def scope_times(events: list[dict], hlo_text: str, depth: int = 3) -> list[dict]:
    """Op events of a trace -> rows {scope, forward_ms, backward_ms, total_ms, ops}, the costliest first."""
    scopes, containers = op_scopes(hlo_text)
    rows: dict[str, dict] = collections.defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0, "ops": 0})
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in scopes or name in containers:
            continue
        key, backward = scope_key(scopes[name], depth)
        row = rows[key]
        row["backward_ms" if backward else "forward_ms"] += event.get("dur", 0) / 1e3
        row["ops"] += 1
    out = [{"scope": k, **v, "total_ms": v["forward_ms"] + v["backward_ms"]} for k, v in rows.items()]
    return sorted(out, key=lambda r: -r["total_ms"])


def _trace_events(trace_dir: Path) -> tuple[str, list[dict]]:
    found = sorted(glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(found[-1]) as f:
        trace = json.load(f)
    return found[-1], trace["traceEvents"] if isinstance(trace, dict) else trace


def profile_train_step(run: RunConfig, out_dir: str | os.PathLike, *, depth: int = 3, name: str = "",
                       progress: Progress = None) -> dict:
    """Trace one train step of `run` into out_dir/trace; the per-scope table (module docstring) and the step."""
    out_dir = Path(out_dir)
    prepared = prepare(run, progress, name)
    untraced_s = prepared.step()
    _say(progress, f"compiled in {prepared.compile_s:.1f} s; one step {untraced_s:.3f} s untraced; tracing one ...")
    with jax.profiler.trace(str(out_dir / "trace"), create_perfetto_trace=True):
        traced_s = prepared.step()
    hlo_text = prepared.compiled.as_text()
    (out_dir / "train_step.hlo.txt").write_text(hlo_text)
    trace_path, events = _trace_events(out_dir / "trace")
    rows = scope_times(events, hlo_text, depth)
    return {"config": name or run.model.name, "compile_s": prepared.compile_s, "step_s": untraced_s,
            "traced_step_s": traced_s, "op_ms": sum(r["total_ms"] for r in rows), "depth": depth,
            "trace": trace_path, "hlo": str(out_dir / "train_step.hlo.txt"), "scopes": rows}


def profile_markdown(result: dict, limit: int = 25) -> str:
    total = result["op_ms"]
    lines = [f"Train step profile: {result['config']}: {result['step_s']:.3f} s per step untraced "
             f"({result['traced_step_s']:.3f} s traced), {total:,.0f} ms of XLA ops, compile "
             f"{result['compile_s']:.1f} s; trace {result['trace']}", "",
             "| scope | forward ms | backward ms | total ms | share | ops |", "|---|---|---|---|---|---|"]
    for row in result["scopes"][:limit]:
        lines.append(f"| {row['scope']} | {row['forward_ms']:,.1f} | {row['backward_ms']:,.1f} | "
                     f"{row['total_ms']:,.1f} | {100 * row['total_ms'] / max(total, 1e-9):.1f}% | {row['ops']:,} |")
    rest = result["scopes"][limit:]
    if rest:
        lines.append(f"| ({len(rest)} more scopes) | | | {sum(r['total_ms'] for r in rest):,.1f} | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# side-by-side timing of variants


def compare(runs: dict[str, RunConfig], *, steps: int = 3, progress: Progress = None) -> dict:
    """Median train-step seconds of each variant, the variants' steps interleaved (a, b, a, b, ...)."""
    if steps < 1 or not runs:
        raise ValueError(f"need at least one variant and one step, got {len(runs)} and {steps}")
    prepared = {label: prepare(run, progress, label) for label, run in runs.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    for k in range(steps):
        for label, p in prepared.items():
            times[label].append(p.step())
            _say(progress, f"step {k + 1}/{steps} {label}: {times[label][-1]:.3f} s, loss {p.loss:.4f}")
    first = next(iter(runs))
    base = statistics.median(times[first])
    return {label: {"step_s": statistics.median(t), "times_s": t, "compile_s": prepared[label].compile_s,
                    "tokens_per_s": runs[label].train.batch_size * runs[label].train.seq_len / statistics.median(t),
                    "vs_first": statistics.median(t) / base, "loss": prepared[label].loss}
            for label, t in times.items()}
