"""The decode and sampler benchmarks on tiny inputs: sane fields, cache bytes from the real cache, CLI bad input."""

import json

import jax.numpy as jnp
import pytest

from train import bench as cli
from v4jax import cost
from v4jax.config import preset
from v4jax.serving import bench


def test_decode_bench_reports_speeds_and_cache_bytes():
    cfg = preset("tiny-v4", pattern="WCH", first_hash_layers=1)  # every V4 cache kind in fewer compiles
    result = bench.decode(cfg, batches=[1, 2], contexts=[24, 40], steps=3, chunk=16)
    assert [(r["batch"], r["context"]) for r in result["rows"]] == [(1, 24), (2, 24), (1, 40), (2, 40)]
    for row in result["rows"]:
        assert row["prefill_tokens"] == row["batch"] * (row["context"] - 3)
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["cache_bytes"] == cost.kv_cache_bytes(cfg, row["context"], cost.plain_format(jnp.dtype(cfg.dtype)),
                                                         batch=row["batch"], include_state=True)
    assert [g["batch"] for g in result["growth"]] == [1, 2]
    assert "decode tok/s" in bench.markdown(result)


@pytest.mark.parametrize("argv, message", [
    (["decode", "--config", "tiny-v4", "--batch", "0"], "--batch lengths must be >= 1, got 0"),
    (["decode", "--config", "tiny-v4", "--context", "8", "--steps", "16"], "--context must exceed --steps"),
    (["decode", "--config", "nope"], "unknown preset 'nope'"),
    (["sample", "--batch", "2,x"], "--batch must be comma-separated integers"),
    (["sample", "--vocab", "0"], "--vocab and --repeats must be >= 1"),
])
def test_decode_cli_bad_input(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_sample_bench_times_every_way_at_every_batch(tmp_path, capsys):
    """Batches below, at and past one sampling block; a vocabulary past the top-k short list, so `top-k 2000` takes
    the thresholds. The bench checks its greedy tokens against the argmax itself."""
    out = tmp_path / "sample.json"
    assert cli.main(["sample", "--batch", "1,8,11", "--vocab", "3000", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 8, 11] and result["modes"] == list(bench.SAMPLING_MODES)
    for row in result["rows"]:
        assert set(row["ms"]) == set(bench.SAMPLING_MODES) and min(row["ms"].values()) > 0
    table = capsys.readouterr().out
    assert "| 11 |" in table and "top-p 0.9" in table
