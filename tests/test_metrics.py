"""Training metrics: FLOPs convention, peak table, CPU matmul peak, MoE balance keys, JSONL records, TensorBoard
event files (read back by an independent parser that checks the CRCs) and the progress line."""

import io
import json
import math
import re
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from v4jax import cost
from v4jax.config import preset
from v4jax.training import metrics
from v4jax.training.config import RunConfig, TrainConfig
from v4jax.training.metrics import MetricsLogger, expert_metrics

# ---------------------------------------------------------------------------------------------------------------
# an independent tfevents reader: bit-by-bit CRC32C, a generic protobuf wire decoder


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[bytes]:
    data, pos, out = Path(path).read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked(header), "length CRC"
        body = data[pos + 12:pos + 12 + length]
        assert len(body) == length
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked(body), "data CRC"
        out.append(body)
        pos += 16 + length
    assert pos == len(data)
    return out


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) pairs: varints as int, fixed64 as double, fixed32 as float, the rest as bytes."""
    out, pos = [], 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 1:
            out.append((number, struct.unpack("<d", buf[pos:pos + 8])[0]))
            pos += 8
        elif wire == 5:
            out.append((number, struct.unpack("<f", buf[pos:pos + 4])[0]))
            pos += 4
        elif wire == 2:
            n = varint()
            out.append((number, buf[pos:pos + n]))
            pos += n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def _read_events(path) -> list[dict]:
    """Each Event as {"wall_time", "step", "file_version"?, "scalars": {tag: value}}."""
    events = []
    for record in _records(path):
        event = {"step": 0, "scalars": {}}
        for number, value in _fields(record):
            if number == 1:
                event["wall_time"] = value
            elif number == 2:
                event["step"] = value
            elif number == 3:
                event["file_version"] = value.decode()
            elif number == 5:
                for vnum, v in _fields(value):
                    assert vnum == 1
                    item = dict(_fields(v))
                    event["scalars"][item[1].decode()] = item[2]
        events.append(event)
    return events


def _logger(tmp_path, **kw):
    kw = {"total_steps": 400, "flops_per_step": 2e12, "peak_flops": 1e14, "progress": False} | kw
    return MetricsLogger(tmp_path, **kw)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and peaks


def test_train_flops_is_three_forwards():
    cfg = preset("tiny-v3")
    assert metrics.train_flops_per_token(cfg, 128) == 3 * cost.flops_per_token(cfg, 128, cost.Phase.PREFILL)
    run = RunConfig(cfg, TrainConfig(batch_size=4, seq_len=64))
    assert metrics.train_flops_per_step(run) == pytest.approx(metrics.train_flops_per_token(cfg, 64) * 4 * 64)


@pytest.mark.parametrize("kind, key", [
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5e", "TPU v5e"), ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"), ("TPU v6 lite", "TPU v6e"), ("TPU7x", "TPU7x"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"), ("NVIDIA B200", "B200"), ("Tesla T4", None),
])
def test_peak_flops_key(kind, key):
    assert metrics.peak_flops_key(kind) == key


def test_device_and_total_peak(monkeypatch):
    h100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", id=0)
    assert metrics.device_peak_flops(h100) == 989e12
    with pytest.raises(KeyError, match="Tesla T4"):
        metrics.device_peak_flops(SimpleNamespace(platform="gpu", device_kind="Tesla T4", id=0))
    gpus = [SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", id=i) for i in range(4)]
    assert metrics.total_peak_flops(gpus) == 4 * 989e12
    # TPU7x: two TensorCores (two JAX devices) per chip, counted once per chip
    tpus = [SimpleNamespace(platform="tpu", device_kind="TPU7x", id=2 * c + core, coords=(c, 0, 0), slice_index=0)
            for c in range(2) for core in range(2)]
    assert metrics.total_peak_flops(tpus) == 2 * 2307e12
    with pytest.warns(UserWarning, match="MFU unavailable"):
        assert metrics.total_peak_flops([SimpleNamespace(platform="gpu", device_kind="Tesla T4", id=0)]) is None
    # the 8 fake CPU devices share the host: one measured peak for all of them
    calls = []
    monkeypatch.setattr(metrics, "_cpu_peak", lambda: calls.append(1) or 5e10)
    assert len(jax.devices()) == 8
    assert metrics.total_peak_flops() == 5e10 and len(calls) == 1


def test_measure_cpu_matmul_peak_is_quick_and_positive():
    start = time.perf_counter()
    flops = metrics.measure_cpu_matmul_peak(size=128, seconds=0.05)
    assert math.isfinite(flops) and flops > 0
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------------------------------------
# MoE statistics


def test_expert_metrics_hand_made():
    load = np.array([[1.0, 1.0, 1.0, 1.0],  # balanced: max/mean 1
                     [4.0, 0.0, 0.0, 0.0],  # one expert: max/mean E = 4
                     [3.0, 1.0, 0.0, 0.0]])  # max 3, mean 1
    dropped = np.array([0.0, 0.5, 0.25])
    out = expert_metrics(load, dropped)
    assert out["moe/layer00/max_over_mean"] == 1.0
    assert out["moe/layer01/max_over_mean"] == 4.0
    assert out["moe/layer02/max_over_mean"] == 3.0
    assert out["moe/layer01/dropped"] == 0.5
    assert out["moe/mean_max_over_mean"] == pytest.approx(8 / 3)
    assert out["moe/max_max_over_mean"] == 4.0
    assert out["moe/mean_dropped"] == pytest.approx(0.25)
    assert len(out) == 3 + 3 + 3
    named = expert_metrics(jax.numpy.asarray(load[:2]), None, names=["layer03", "mtp"])
    assert set(named) == {"moe/layer03/max_over_mean", "moe/mtp/max_over_mean", "moe/mean_max_over_mean",
                          "moe/max_max_over_mean"}
    assert expert_metrics(np.zeros((1, 4)))["moe/layer00/max_over_mean"] == 0.0  # nothing routed
    assert expert_metrics(None) == {}
    with pytest.raises(ValueError, match="names"):
        expert_metrics(load, names=["a"])


def test_moe_layer_names_match_model_rows():
    from v4jax import model

    cfg = preset("tiny-v3", num_hidden_layers=3, first_dense_layers=1, first_hash_layers=1)  # dense, hash, moe
    names = metrics.moe_layer_names(cfg)
    assert names == ["layer01", "layer02", "mtp"]
    params = jax.eval_shape(lambda k: model.init(cfg, k), jax.random.key(0))  # shapes only: no weights
    tokens = jax.numpy.zeros((1, 64), jax.numpy.int32)
    out = jax.eval_shape(lambda p, t: model.apply(cfg, p, t), params, tokens)
    assert out.expert_load.shape == (len(names), cfg.n_routed_experts)
    assert out.dropped_fraction.shape == (len(names),)


# ---------------------------------------------------------------------------------------------------------------
# the logger


def test_jsonl_records_and_mfu(tmp_path):
    with _logger(tmp_path) as log:
        log.log(10, {"loss": jax.numpy.float32(3.5), "grad_norm": 0.75, "lr": np.float64(1e-3)}, tokens=4096,
                step_time=0.5)
        log.log(20, {"loss": 3.25, "nested": {"a": 1.5}, "per_group": np.array([1.0, 2.0])}, tokens=4096,
                step_time=0.25)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["step"] == 10 and first["loss"] == 3.5 and first["grad_norm"] == 0.75
    assert first["lr"] == pytest.approx(1e-3)
    assert first["tokens"] == 4096 and first["step_time"] == 0.5
    assert first["tokens_per_s"] == pytest.approx(4096 / 0.5)
    assert first["mfu"] == pytest.approx(2e12 / 0.5 / 1e14)  # 4 %
    assert second["mfu"] == pytest.approx(0.08)
    assert second["nested/a"] == 1.5 and second["per_group/0"] == 1.0 and second["per_group/1"] == 2.0
    assert second["elapsed_s"] >= 0 and second["time"] > 1e9


def test_unknown_peak_and_non_finite(tmp_path):
    with _logger(tmp_path, peak_flops=None, tensorboard=False) as log:
        record = log.log(1, {"loss": float("nan")}, tokens=10, step_time=1.0)
    assert "mfu" not in record and record["tokens_per_s"] == 10
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["loss"] is None and "mfu" not in line


def test_expert_arrays_become_expert_metrics(tmp_path):
    load = jax.numpy.asarray([[2.0, 2.0], [3.0, 1.0]])
    with _logger(tmp_path, layer_names=["layer01", "layer02"]) as log:
        record = log.log(5, {"loss": 1.0, "expert_load": load, "dropped_fraction": jax.numpy.asarray([0.0, 0.1])},
                         tokens=1, step_time=1.0)
    assert record["moe/layer01/max_over_mean"] == 1.0 and record["moe/layer02/max_over_mean"] == 1.5
    assert record["moe/layer02/dropped"] == pytest.approx(0.1)
    assert "expert_load" not in record
    with _logger(tmp_path / "b") as log, pytest.raises(ValueError, match="shape"):
        log.log(1, {"matrix": np.ones((2, 2))}, tokens=1, step_time=1.0)


def test_tensorboard_file_reads_back(tmp_path):
    with _logger(tmp_path) as log:
        log.log(10, {"loss": 3.5, "moe": {"layer03": {"max_over_mean": 1.25}}}, tokens=4096, step_time=0.5)
        log.log(20, {"loss": 3.25}, tokens=4096, step_time=0.25)
        path = log.tensorboard_path
    assert Path(path).parent == tmp_path / "tensorboard" and "tfevents" in Path(path).name
    events = _read_events(path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["step"] for e in events[1:]] == [10, 20]
    first, second = events[1]["scalars"], events[2]["scalars"]
    assert first["loss"] == 3.5 and first["moe/layer03/max_over_mean"] == 1.25
    assert first["mfu"] == pytest.approx(0.04) and first["tokens_per_s"] == pytest.approx(8192)
    assert second["loss"] == 3.25 and second["mfu"] == pytest.approx(0.08, rel=1e-6)
    assert all(abs(e["wall_time"] - time.time()) < 600 for e in events)


def test_tensorboard_event_accumulator(tmp_path):
    """TensorBoard itself reads the file (only where `tensorboard` is installed; it is not a dependency)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with _logger(tmp_path) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 4.0 - step}, tokens=100, step_time=0.1)
    ea = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert {"loss", "mfu", "tokens_per_s"} <= set(ea.Tags()["scalars"])
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_crc32c_known_vector():
    assert metrics.crc32c(b"123456789") == 0xE3069283 == _crc32c_bitwise(b"123456789")


# ---------------------------------------------------------------------------------------------------------------
# the progress line

LINE = re.compile(r"step +(\d+)/(\d+) \[([=> ]{20})\] loss (\S+) \| ([\d,]+) tok/s \| MFU ([\d.]+)% \| eta (\S+)")


def test_progress_lines_when_not_a_tty(tmp_path, capsys):
    with _logger(tmp_path, progress=True, jsonl=False, tensorboard=False) as log:
        log.log(120, {"loss": 3.21}, tokens=1280, step_time=0.25)
        log.log(130, {"loss": 3.2}, tokens=1280, step_time=0.25)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    match = LINE.fullmatch(lines[0])
    assert match, lines[0]
    # 1280 tokens / 0.25 s; MFU 2e12 / 0.25 s / 1e14; eta (400 - 120) x 0.25 s
    assert match.groups() == ("120", "400", "======>" + " " * 13, "3.21", "5,120", "8.0", "1m10s")
    assert LINE.fullmatch(lines[1])


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_in_place_on_a_tty(tmp_path):
    stream = _Tty()
    log = _logger(tmp_path, progress=True, jsonl=False, tensorboard=False, stream=stream)
    log.log(1, {"loss": 2.0}, tokens=10, step_time=0.1)
    log.log(2, {"loss": 1.5}, tokens=10, step_time=0.1)
    assert "\n" not in stream.getvalue() and stream.getvalue().count("\r") == 2
    log.note("eval loss 1.4")
    log.log(400, {"loss": 1.0}, tokens=10, step_time=0.1)
    log.close()
    out = stream.getvalue()
    assert "eval loss 1.4\n" in out and out.endswith("\n")
    assert "[" + "=" * 20 + "]" in out.split("\r")[-1]


def test_progress_line_parts():
    assert metrics.progress_line(0, 10, None, None, None, None) == "step  0/10 [>                   ]"
    assert metrics.format_duration(42) == "42s"
    assert metrics.format_duration(80) == "1m20s"
    assert metrics.format_duration(7380) == "2h03m"


def test_inactive_process_writes_nothing(tmp_path, capsys):
    with _logger(tmp_path / "w", active=False, progress=True) as log:
        record = log.log(1, {"loss": 1.0}, tokens=1, step_time=1.0)
    assert record["loss"] == 1.0
    assert not (tmp_path / "w").exists() and capsys.readouterr().err == ""
