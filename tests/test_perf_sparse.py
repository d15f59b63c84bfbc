"""Performance suite section 3 (`v4jax.perf_sparse`): the 1M-token serving cache against cost.py, and a tiny
scaling run (two kinds, two short lengths) with its memory figures, growth and skipped points."""

import json
import math

import pytest

from v4jax import cost, perf_sparse
from v4jax.config import AttentionKind


@pytest.fixture(scope="module")
def cache_1m():
    return perf_sparse.cache_bytes()


@pytest.fixture(scope="module")
def tiny_scaling():
    lines = []
    result = perf_sparse.scaling(kinds="MH", seqs=[256, 128], repeats=1, progress=lines.append)
    return result, lines


def test_cache_bytes_agree_with_cost_model(cache_1m):
    c = cache_1m
    v4, v3 = c["v4"], c["v3"]
    assert c["context"] == 2 ** 20 and v4["layers"] == v3["layers"] == 43
    assert v4["pattern"] == "WW" + "CH" * 20 + "C" and v3["pattern"] == "M" * 43
    assert v4["dtype"] == v3["dtype"] == "bfloat16"
    for stack in (v4, v3):
        assert stack["bytes"] > 0 and stack["bytes"] == stack["analytic_bytes"]
        for row in stack["kinds"].values():
            assert row["bytes"] > 0 and row["bytes"] == row["analytic_bytes"]
        assert sum(r["bytes"] for r in stack["kinds"].values()) == stack["bytes"] == sum(stack["dtypes"].values())
    # V3's MLA entry: (512 latent + 64 rope) x 2 bytes per token per layer, no state.
    assert v3["bytes"] == 43 * 1152 * 2 ** 20 and v3["bytes_per_token"] == 43 * 1152
    assert {k: r["layers"] for k, r in v4["kinds"].items()} == {"W": 2, "C": 21, "H": 20}
    # C: entry 512 + indexer key 128 bf16 per 4 tokens (+ the window ring and float32 states).
    assert v4["kinds"]["C"]["bytes_per_token"] == pytest.approx(21 * (512 + 128) * 2 / 4, rel=1e-3)
    assert v4["dtypes"]["float32"] > 0  # the compressors' pending states
    assert c["ratio_v3_over_v4"] == pytest.approx(c["analytic_ratio_v3_over_v4"]) and c["ratio_v3_over_v4"] > 7
    prod = c["production_formats"]
    assert prod["v4_bytes"] == cost.kv_cache_bytes(perf_sparse.preset("deepseek-v4-flash"), 2 ** 20, cost.V4_FP8,
                                                   include_state=True)
    assert prod["ratio_v3_over_v4"] > 1
    json.dumps(c)


def test_cache_bytes_short_context_agrees_too():
    c = perf_sparse.cache_bytes(4096)
    assert c["v4"]["bytes"] == c["v4"]["analytic_bytes"] > 0
    assert c["v3"]["bytes"] == c["v3"]["analytic_bytes"] == 43 * 1152 * 4096
    assert c["ratio_v3_over_v4"] > 1
    with pytest.raises(ValueError, match="context"):
        perf_sparse.cache_bytes(0)


def test_tiny_scaling_run(tiny_scaling):
    s, lines = tiny_scaling
    assert s["kinds"] == ["M", "H"] and s["seqs"] == [128, 256] and not s["skipped"]
    assert len(s["layers"]) == 4
    for row in s["layers"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["repeats"] == 1
        assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0
    for kind in ("M", "H"):
        g = s["growth"][kind]
        assert (g["from_seq"], g["to_seq"], g["linear"], g["quadratic"]) == (128, 256, 2.0, 4.0)
        assert g["measured"] > 0 and g["flops"] > 1 and g["temp_bytes"] > 0
        assert g["verdict"] in ("linear-ish", "super-linear", "quadratic-ish")
    assert any(line.startswith("M at 256 tokens:") and "ms" in line for line in lines)
    json.dumps(s)


def test_slow_points_are_skipped_with_a_reason():
    s = perf_sparse.scaling(kinds="W", seqs=[128, 256], repeats=3, budget_s=1e-9)
    first, second = s["layers"]
    assert first["seq"] == 128 and first["repeats"] == 1 and first["ms"] > 0  # capped to one call
    assert second["seq"] == 256 and "over the 1e-09 s budget" in second["skipped"]
    assert second["predicted_s"] > 0 and s["skipped"] == [second]
    assert "skipped" in s["growth"]["W"]
    assert "skipped" in perf_sparse.markdown({"scaling": s})


def test_markdown_names_kinds_and_cache(tiny_scaling, cache_1m):
    text = perf_sparse.markdown({"scaling": tiny_scaling[0], "cache_1m": cache_1m})
    assert "| M |" in text and "| H |" in text and "| C |" in text and "| W |" in text
    assert "128 ms / MiB" in text and "7.18x" in text and "deepseek-v4-flash" in text


def test_growth_and_prediction_use_the_cost_model():
    cfg = perf_sparse.layer_config()
    full = perf_sparse._predicted_s(cfg, AttentionKind.FULL, (8192, 1.0), 16384)
    window = perf_sparse._predicted_s(cfg, AttentionKind.WINDOW, (8192, 1.0), 16384)
    assert full > 3 and 2 <= window < 2.2  # quadratic attention vs window-bounded
    assert perf_sparse._predicted_s(cfg, AttentionKind.FULL, None, 2048) is None
