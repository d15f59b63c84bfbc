"""Training metrics: model FLOPs and MFU, per-layer MoE statistics, and one logger that writes JSONL, TensorBoard
event files and a progress line.

    flops = train_flops_per_step(run)                 # 3 x forward FLOPs per token x tokens per step
    peak = total_peak_flops()                         # bf16 peak of every chip (CPU: measured matmul peak)
    with MetricsLogger(workdir, run.train.steps, flops, peak, layer_names=moe_layer_names(run.model)) as log:
        log.log(step, {"loss": loss, "expert_load": out.expert_load, ...}, tokens=b * t, step_time=dt)
        log.log_eval(step, {"loss": eval_loss, "tokens": eval_tokens})  # held out: eval_loss, eval_tokens

MFU (model FLOPs utilisation) = model FLOPs per step / step seconds / peak FLOP/s. "Model" FLOPs are the analytic
ones of `cost.py`, the same whatever the implementation does: rematerialised forwards are not counted (that would be
hardware FLOPs utilisation), nor softmax, norms or the optimizer update.

TensorBoard files are written by a small built-in writer (`EventWriter`), not TensorFlow, `tensorboard` or
`tensorboardX`: a tfevents file is a sequence of records `uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`, each `data` a serialized `tensorflow.Event` protobuf. Scalars need four message fields,
which are encoded here by hand (see `_event`), so the format costs no dependency and no generated protobuf code tied
to a protobuf runtime version.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import struct
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import cost
from v4jax.config import ModelConfig

# ---------------------------------------------------------------------------------------------------------------
# model FLOPs


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x `cost.flops_per_token(cfg, seq_len, Phase.PREFILL)`.

    Convention: the backward pass costs twice the forward (one matmul for the gradient of the activations, one for
    the gradient of the weights, for every forward matmul), so forward + backward = 3 x forward; for a dense model
    this is the usual 6 N FLOPs per token, plus attention. The forward figure is cost.py's: matmuls only, 2 FLOPs per
    multiply-add, routed experts counted at top-k (active parameters), causal attention averaged over the positions of
    a `seq_len`-token sequence (query t sees t + 1 keys, or its window / compressed entries), the MTP block excluded.
    Remat recomputation is not counted (model FLOPs, not hardware FLOPs).
    """
    return 3.0 * cost.flops_per_token(cfg, seq_len, cost.Phase.PREFILL)


def train_flops_per_step(run) -> float:
    """`train_flops_per_token` x the tokens of one optimizer step (`batch_size` sequences of `seq_len`, all
    micro-batches together) for a `RunConfig`."""
    t = run.train
    return train_flops_per_token(run.model, t.seq_len) * t.batch_size * t.seq_len


# ---------------------------------------------------------------------------------------------------------------
# peak FLOP/s

# Dense (no sparsity) bf16 peak FLOP/s per chip, from the vendors' public specifications.
PEAK_FLOPS: dict[str, float] = {
    # Google Cloud TPU docs, "System architecture" tables (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, /tpu7x).
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,  # Trillium
    "TPU7x": 2307e12,  # Ironwood: 2 TensorCores per chip, each its own JAX device (4614 TFLOP/s is FP8)
    # NVIDIA datasheets: BF16 Tensor Core, dense = half the "with sparsity" figure.
    "A100": 312e12,  # A100 datasheet (SXM and PCIe alike)
    "H100": 989e12,  # H100 SXM datasheet: 1,979 TFLOP/s with sparsity
    "H100 PCIe": 756e12,  # H100 PCIe datasheet: 1,513 TFLOP/s with sparsity
    "H200": 989e12,  # H200 SXM datasheet: 1,979 TFLOP/s with sparsity (same compute as H100 SXM)
    "B200": 2250e12,  # HGX B200 datasheet: 4.5 PFLOP/s with sparsity per GPU
}

# jax `device.device_kind` (lower case) -> PEAK_FLOPS key, for the TPU names JAX reports; GPUs match by substring.
_TPU_KINDS = {
    "tpu v4": "TPU v4",
    "tpu v5 lite": "TPU v5e", "tpu v5e": "TPU v5e",
    "tpu v5": "TPU v5p", "tpu v5p": "TPU v5p",
    "tpu v6 lite": "TPU v6e", "tpu v6e": "TPU v6e",
    "tpu7x": "TPU7x", "tpu v7x": "TPU7x",
}


def peak_flops_key(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` entry of a JAX `device_kind` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...), or None."""
    kind = device_kind.strip().lower()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    if "h100" in kind:
        return "H100 PCIe" if "pcie" in kind else "H100"
    for gpu in ("A100", "H200", "B200"):
        if gpu.lower() in kind:
            return gpu
    return None


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of the chip holding `device` (default: the first device): bf16 from `PEAK_FLOPS` for TPUs and
    GPUs, the measured float32 matmul rate of the whole process (`measure_cpu_matmul_peak`, measured once and cached)
    for CPU. Raises KeyError for an accelerator the table lacks."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return _cpu_peak()
    key = peak_flops_key(device.device_kind)
    if key is None:
        raise KeyError(f"no peak FLOP/s known for device kind {device.device_kind!r}; known: {sorted(PEAK_FLOPS)}")
    return PEAK_FLOPS[key]


def total_peak_flops(devices: Sequence | None = None) -> float | None:
    """Peak FLOP/s of all `devices` (default: `jax.devices()`), each chip counted once: CPU devices share their
    host's cores, so those of one process count one measured CPU peak (this host's; hosts assumed alike); TPU devices
    on one chip (TPU7x's two TensorCores) count that chip once. None, with a warning, when a device kind is not in
    `PEAK_FLOPS`."""
    devices = jax.devices() if devices is None else list(devices)
    chips = {}
    for d in devices:
        if d.platform == "cpu":
            chips[("cpu", d.process_index)] = d
        elif d.platform == "tpu" and getattr(d, "coords", None) is not None:
            chips[("tpu", getattr(d, "slice_index", 0), tuple(d.coords))] = d
        else:
            chips[(d.platform, d.id)] = d
    try:
        return sum(device_peak_flops(d) for d in chips.values())
    except KeyError as e:
        warnings.warn(f"MFU unavailable: {e.args[0]}", stacklevel=2)
        return None


def measure_cpu_matmul_peak(size: int = 1024, seconds: float = 1.0, min_repeats: int = 3) -> float:
    """FLOP/s of a jitted float32 [size, size] @ [size, size] matmul on this process's first CPU device: the best of
    at least `min_repeats` timed calls (more while under `seconds`), after one untimed warm-up (compile excluded).
    XLA's CPU matmul uses the process's whole thread pool, so this is the rate of the process, not of one (fake)
    device."""
    cpu = jax.local_devices(backend="cpu")[0]  # jax.devices() lists other processes' devices too
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((size, size), dtype=np.float32), cpu) for _ in range(2))
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best, start = math.inf, time.perf_counter()
    repeats = 0
    while repeats < min_repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t0)
        repeats += 1
    return 2.0 * size ** 3 / best


@functools.cache
def _cpu_peak() -> float:
    return measure_cpu_matmul_peak()


# ---------------------------------------------------------------------------------------------------------------
# memory bandwidth


def measure_memory_bandwidth(mib: int = 256, repeats: int = 5, rounds: int = 3, device=None) -> float:
    """Bytes/s a jitted streaming op sustains on `device` (default: this process's first CPU device): STREAM's
    triad `x = x * 1.0001 + y` on two float32 buffers of `mib` MiB each, far larger than any cache, so every call
    reads 2 x `mib` MiB from memory and writes `mib` MiB back. `x` is donated, so the result is written in place (no
    fresh output buffer whose first-touch page faults would be timed). Counted bytes: 3 x `mib` MiB per call (read
    x, read y, write x). Each of `rounds` rounds times `repeats` calls after one untimed warm-up (compile excluded)
    and takes their median; the best round is returned (a busy moment on a shared machine lowers one round, not
    the figure). XLA runs the fusion on the process's thread pool, as it does a decode step's weight reads, so this
    is the process's rate, not one core's. Used for the decode roofline: bytes a step must read / this rate."""
    if mib < 1 or repeats < 1 or rounds < 1:
        raise ValueError(f"mib, repeats and rounds must be >= 1, got {mib}, {repeats}, {rounds}")
    device = jax.local_devices(backend="cpu")[0] if device is None else device
    n = mib * 2**20 // 4
    x, y = (jax.device_put(np.full(n, value, np.float32), device) for value in (1.0, 0.5))
    triad = jax.jit(lambda a, b: a * np.float32(1.0001) + b, donate_argnums=0).lower(x, y).compile()
    x = jax.block_until_ready(triad(x, y))
    best = math.inf
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x = jax.block_until_ready(triad(x, y))
            times.append(time.perf_counter() - start)
        best = min(best, float(np.median(times)))
    return 3.0 * n * 4 / best


# ---------------------------------------------------------------------------------------------------------------
# MoE statistics


def moe_layer_names(cfg: ModelConfig) -> list[str]:
    """Names of the rows of `ModelOutput.expert_load` / `dropped_fraction`: "layerNN" (the model's layer index) for
    every MoE or hash-routed layer in order, then "mtp" when the MTP block has routed experts."""
    from v4jax.model import moe_layers

    return ["mtp" if i == cfg.num_hidden_layers else f"layer{i:02d}" for i in moe_layers(cfg)]


def expert_metrics(expert_load, dropped_fraction=None, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-layer expert balance from `expert_load` [layers, E] (assignments per expert; any scale, e.g. summed over
    steps) and `dropped_fraction` [layers] (assignments dropped for capacity):

        moe/<name>/max_over_mean   busiest expert's load / the mean load (1 = perfectly balanced, E = one expert)
        moe/<name>/dropped         the dropped fraction
        moe/mean_max_over_mean, moe/max_max_over_mean, moe/mean_dropped   over the layers

    `names` label the rows (default "layer00", "layer01", ... by row; `moe_layer_names(cfg)` gives the model's layer
    indices). A layer that routed nothing has ratio 0. None or an empty load gives {}.
    """
    if expert_load is None:
        return {}
    load = np.asarray(jax.device_get(expert_load), dtype=np.float64)
    if load.size == 0:
        return {}
    if load.ndim != 2:
        raise ValueError(f"expert_load must be [layers, experts], got shape {load.shape}")
    names = [f"layer{i:02d}" for i in range(load.shape[0])] if names is None else list(names)
    if len(names) != load.shape[0]:
        raise ValueError(f"{len(names)} names for {load.shape[0]} rows of expert_load")
    mean = load.mean(axis=1)
    ratio = np.divide(load.max(axis=1), mean, out=np.zeros_like(mean), where=mean > 0)
    out = {f"moe/{n}/max_over_mean": float(r) for n, r in zip(names, ratio)}
    summary = {"moe/mean_max_over_mean": float(ratio.mean()), "moe/max_max_over_mean": float(ratio.max())}
    if dropped_fraction is not None:
        dropped = np.asarray(jax.device_get(dropped_fraction), dtype=np.float64).reshape(-1)
        if dropped.shape[0] != load.shape[0]:
            raise ValueError(f"dropped_fraction has {dropped.shape[0]} rows, expert_load {load.shape[0]}")
        out |= {f"moe/{n}/dropped": float(f) for n, f in zip(names, dropped)}
        summary["moe/mean_dropped"] = float(dropped.mean())
    return out | summary


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard event files


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: the CRC rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialized `tensorflow.Event`: wall_time (1, double), step (2, int64), file_version (3, string) or
    summary (5, `Summary`: repeated value (1) of `Summary.Value`: tag (1, string), simple_value (2, float))."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _field(5, values)
    return out


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir` (what TensorBoard reads)."""

    def __init__(self, logdir: str | os.PathLike):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.v4jax"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))
        self.flush()

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                         + struct.pack("<I", masked_crc32c(data)))

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """One event holding every (tag, value) of `values` at `step`."""
        if values:
            self._write(_event(time.time() if wall_time is None else wall_time, step, scalars=values))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---------------------------------------------------------------------------------------------------------------
# the logger


def scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """Flatten `metrics` to named scalars: nested mappings join keys with "/", size-1 arrays become numbers, 1-D
    arrays one scalar per element ("name/0", "name/1", ...). Larger arrays raise ValueError: reduce them first (the
    logger turns `expert_load` and `dropped_fraction` into `expert_metrics` itself)."""
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= scalars(value, f"{name}/")
            continue
        if value is None:
            continue
        array = np.asarray(value)
        if array.size == 1:
            item = array.reshape(()).item()
            out[name] = item if isinstance(item, int) and not isinstance(item, bool) else float(item)
        elif array.ndim == 1:
            out |= {f"{name}/{i}": float(v) for i, v in enumerate(array.tolist())}
        else:
            raise ValueError(f"metric {name!r} has shape {array.shape}; log scalars or 1-D arrays")
    return out


def format_duration(seconds: float) -> str:
    """42s, 1m20s, 2h03m."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(step: int, total: int, loss: float | None, tokens_per_s: float | None, mfu: float | None,
                  eta_s: float | None, width: int = 20) -> str:
    """`step 120/400 [======>             ] loss 3.21 | 5,120 tok/s | MFU 12.3% | eta 1m10s` (parts without a value
    left out)."""
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    filled = int(frac * width)
    bar = "=" * width if filled >= width else "=" * filled + ">" + " " * (width - filled - 1)
    parts = [f"step {step:>{len(str(total))}}/{total} [{bar}]" + (f" loss {loss:.4g}" if loss is not None else "")]
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each `log` call to `workdir/metrics.jsonl` (one JSON object per line, appended across restarts),
    TensorBoard scalars under `workdir/tensorboard/`, and a progress line on stderr.

    `flops_per_step`: model FLOPs of one optimizer step (`train_flops_per_step`); `peak_flops`: FLOP/s of all chips
    together (`total_peak_flops`), None or 0 when unknown (MFU then left out). `layer_names` labels the rows of a
    logged `expert_load` (`moe_layer_names(cfg)`). Only process 0 writes unless `active` says otherwise. `stream`
    defaults to the current `sys.stderr`: on a terminal the progress line is redrawn in place, otherwise each call
    prints one line.
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, flops_per_step: float,
                 peak_flops: float | None, tensorboard: bool = True, jsonl: bool = True, progress: bool = True, *,
                 layer_names: Sequence[str] | None = None, active: bool | None = None, stream: TextIO | None = None):
        self.workdir = os.fspath(workdir)
        self.total_steps = total_steps
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops or None
        self.layer_names = layer_names
        self.active = jax.process_index() == 0 if active is None else active
        self._stream = stream
        self._progress = progress and self.active
        self._start = time.time()
        self._first: tuple[int, float] | None = None  # (step, wall time) of the first log call, for the ETA
        self._open_line = False  # a TTY progress line is drawn and not ended
        self._jsonl = self._tb = None
        if not self.active:
            return
        if jsonl or tensorboard:
            os.makedirs(self.workdir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
        if tensorboard:
            self._tb = EventWriter(os.path.join(self.workdir, "tensorboard"))

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    @property
    def tensorboard_path(self) -> str | None:
        """The event file being written (None without TensorBoard)."""
        return self._tb.path if self._tb else None

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._stream is None else self._stream

    def _tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def expert_metrics(self, expert_load, dropped_fraction=None) -> dict[str, float]:
        return expert_metrics(expert_load, dropped_fraction, self.layer_names)

    def derived(self, tokens: int, step_time: float) -> dict[str, float]:
        """tokens_per_s = tokens / step_time and mfu = flops_per_step / step_time / peak_flops, where known."""
        if not step_time or step_time <= 0 or not math.isfinite(step_time):
            return {}
        out = {"tokens_per_s": tokens / step_time}
        if self.peak_flops:
            out["mfu"] = self.flops_per_step / step_time / self.peak_flops
        return out

    def log(self, step: int, metrics: Mapping[str, Any], tokens: int, step_time: float) -> dict[str, Any]:
        """Record `metrics` at `step`. `tokens` and `step_time` describe one optimizer step (tokens it trained on,
        its seconds; pass a mean over the logging interval if you have one). Values may be Python numbers or
        (device) arrays; `expert_load` [layers, E] and `dropped_fraction` [layers] become `expert_metrics`, other
        entries are flattened by `scalars`. Returns the JSON record. Non-finite values are written as null."""
        metrics = dict(jax.device_get(dict(metrics)))
        load, dropped = metrics.pop("expert_load", None), metrics.pop("dropped_fraction", None)
        values = scalars(metrics)
        if load is not None:
            values |= self.expert_metrics(load, dropped)
        elif dropped is not None:
            values |= scalars({"dropped_fraction": dropped})
        values |= {"tokens": int(tokens), "step_time": float(step_time)} | self.derived(tokens, step_time)
        now = time.time()
        record = self._write(step, values, now)
        if self.active and self._progress:
            self._draw(int(step), values, step_time, now)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record held-out metrics at `step` (`{"loss": ..., "mtp_loss": ..., "tokens": ...}`) as `eval_<name>` in
        their own JSONL line and TensorBoard event (the train records keep their keys), and print one line.
        Returns the JSON record."""
        values = {f"eval_{k}": v for k, v in scalars(dict(jax.device_get(dict(metrics)))).items()}
        record = self._write(step, values, time.time())
        shown = " | ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:.4g}" for k, v in values.items())
        self.note(f"eval step {int(step)}/{self.total_steps}: {shown}")
        return record

    def _write(self, step: int, values: Mapping[str, int | float], now: float) -> dict[str, Any]:
        """One record (step, time, elapsed, values) to the JSONL file (non-finite as null) and TensorBoard."""
        record = {"step": int(step), "time": now, "elapsed_s": now - self._start} | dict(values)
        if not self.active:
            return record
        if self._jsonl:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
            self._jsonl.write(json.dumps(clean, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb:
            self._tb.scalars(int(step), {k: float(v) for k, v in values.items()}, wall_time=now)
            self._tb.flush()
        return record

    def _eta(self, step: int, step_time: float, now: float) -> float | None:
        remaining = max(self.total_steps - step, 0)
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        if step > first_step:  # measured wall clock per step: includes data, eval and logging time
            return remaining * (now - first_time) / (step - first_step)
        return remaining * step_time if step_time and math.isfinite(step_time) else None

    def _draw(self, step: int, values: Mapping[str, float], step_time: float, now: float) -> None:
        loss = values.get("loss")
        line = progress_line(step, self.total_steps, loss, values.get("tokens_per_s"), values.get("mfu"),
                             self._eta(step, step_time, now))
        if self._tty():
            self.stream.write("\r" + line + "\x1b[K")
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """Print a message on the progress stream without garbling the progress line (eval results, saves)."""
        if not self._progress:
            return
        if self._open_line:
            self.stream.write("\r\x1b[K")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the progress line and close the files (safe to call twice)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._tb:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

