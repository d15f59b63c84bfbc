"""The context-parallelism benchmark on tiny-v4 at a short length over context 1 and 4: both rows measured with
sane figures, the peak ratio as defined, the Markdown table, and the `python -m train.bench context` command line's
bad input (one line, exit code 2)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from train import bench as cli
from v4jax import config
from v4jax.attention import context_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ = 512


@pytest.fixture(scope="module")
def tiny_v4():
    return config.preset("tiny-v4")


@pytest.fixture(scope="module")
def result(tiny_v4):
    return context_bench.context(tiny_v4, [SEQ], [4, 1], repeats=1)


def test_both_contexts_measured_with_sane_figures(result):
    assert [(r["seq"], r["context"], r["local_seq"]) for r in result["rows"]] == [(SEQ, 1, SEQ), (SEQ, 4, SEQ // 4)]
    assert result["contexts"] == [1, 4] and result["reference_context"] == 1 and result["rules"] == "long"
    assert result["config"] == "tiny-v4" and result["batch"] == 1 and result["devices"] == 8
    one, four = result["rows"]
    for row in (one, four):
        m = row["memory"]
        assert m["total_bytes"] > 0 and m["temp_bytes"] > 0 and m["argument_bytes"] > 0
        assert m["total_bytes"] == m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
        assert m["output_bytes"] <= 16  # the mean logit, not [b, t, vocab]
        assert row["forward_s"] > 0 and row["tokens_per_s"] == pytest.approx(SEQ / row["forward_s"])
        assert row["compile_s"] > 0 and len(row["times_s"]) == 1 and "skipped" not in row
    assert one["peak_ratio"] == 1.0 and one["ideal_ratio"] == 1
    assert four["peak_ratio"] == one["memory"]["total_bytes"] / four["memory"]["total_bytes"]
    assert four["ideal_ratio"] == 4
    [verdict] = result["verdicts"]
    assert verdict["context"] == 4 and verdict["target"] == 2.5 and verdict["ratio"] == four["peak_ratio"]
    assert verdict["met"] == (four["peak_ratio"] >= 2.5)
    json.dumps(result)  # JSON-able as is


def test_markdown_has_the_header_and_one_row_per_context(result):
    table = context_bench.markdown(result)
    assert ("| seq | context | tokens / device | compile s | forward ms | tokens/s | peak MiB / device | "
            "temp MiB / device | peak ratio (context 1 / this) | ideal |") in table
    assert f"| {SEQ} | 1 | {SEQ} |" in table and f"| {SEQ} | 4 | {SEQ // 4} |" in table
    four = result["rows"][1]
    assert f"| {four['peak_ratio']:.2f} | 4 |" in table
    assert f"- seq {SEQ}, context 4: {four['peak_ratio']:.2f}x less" in table and "2.5x target" in table


def test_not_timed_past_the_memory_limit_still_has_its_memory(tiny_v4):
    result = context_bench.context(tiny_v4, [64], [1], repeats=1, memory_limit_bytes=1)
    [row] = result["rows"]
    assert row["skipped"].startswith("would need") and "forward_s" not in row and row["memory"]["total_bytes"] > 0
    assert "not timed" in context_bench.markdown(result) and result["verdicts"] == []


def test_check(tiny_v4):
    assert context_bench.granule(tiny_v4) == 16  # lcm of the C and H ratios 4, 16
    assert context_bench.granule(config.preset("tiny-hybrid")) == 1  # no compressed layers
    context_bench.check(tiny_v4, [1024, 131072], [1, 8], devices=8)
    for seqs, contexts, message in [([1000], [1], "multiple of 16"), ([1024], [8, 3], "multiple of 48"),
                                    ([512], [0], "context sizes must be >= 1"),
                                    ([512], [16], "context 16 needs 16 devices, only 8"),
                                    ([0], [1], "lengths must be >= 1"), ([], [1], "no sequence lengths")]:
        with pytest.raises(ValueError, match=message):
            context_bench.check(tiny_v4, seqs, contexts, devices=8)


@pytest.mark.parametrize("argv, message", [
    (["--seq", "1000"], "seq 1000 does not split over context 1: it must be a multiple of 16"),
    (["--seq", "1024", "--context", "1,3"], "multiple of 48"),
    (["--seq", "1024", "--context", "0,8"], "--context sizes must be >= 1"),
    (["--seq", "1024", "--context", "16"], "--context 16 needs 16 devices, cpu has 8"),
    (["--seq", "1024", "--context", "x"], "--context must be comma-separated integers"),
    (["--seq", "0"], "--seq lengths must be >= 1"),
    (["--seq", "1024", "--repeats", "0"], "--repeats must be >= 1"),
    (["--seq", "1024", "--config", "nope"], "unknown preset 'nope'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["context", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_cli_gives_itself_the_devices_and_rejects_a_bad_length():
    assert cli._context_devices(["context", "--seq", "64"]) == 8  # the default 1,8
    assert cli._context_devices(["context", "--context=2,4"]) == 4
    assert cli._context_devices(["context", "--context", "1,1000"]) == cli.MAX_FAKE_DEVICES
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command must ask for its devices
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "train.bench", "context", "--seq", "1000", "--context", "1,8"]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "seq 1000 does not split over context 1: it must be a multiple of 16" in err
