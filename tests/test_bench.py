"""The forward benchmark: a tiny run returns every figure as a positive finite number; bad CLI input exits 2."""

import math
import pathlib
import subprocess
import sys

import pytest

from v4jax import bench, config, cost

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_forward_bench_tiny(tiny_hybrid):
    cfg, _ = tiny_hybrid  # the shared fixture compiles `model.init` once for the session; the bench reuses it
    result = bench.forward(cfg, seq=128, batch=1, repeats=1, layer_seq=256)
    assert {"forward", "layers", "split", "ratio", "counts"} <= result.keys()
    assert {"compile_s", "step_s", "tokens_per_s"} <= result["forward"].keys()
    assert {(row["kind"], row["seq"]) for row in result["layers"]} == {("M", 128), ("S", 128), ("M", 256),
                                                                       ("S", 256)}
    assert result["counts"] == {"M": 3, "S": 6}
    assert result["split"]["fraction"].keys() == {"M", "S"}
    assert math.isclose(sum(result["split"]["fraction"].values()), 1.0)
    assert {"measured", "flops"} <= result["ratio"].keys()
    assert {"attention_ideal", "attention_kernel", "layer"} <= result["ratio"]["flops"].keys()
    numbers = list(_numbers({k: result[k] for k in ("forward", "layers", "split", "ratio")}))
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers)
    table = bench.markdown(result)
    assert "tokens/s" in table and "| M |" in table and "| S |" in table


def test_flop_ratios_follow_the_window():
    cfg = config.preset("tiny-hybrid")  # window 16, block 64
    assert bench.visible_pairs(16384, None) == 16384 * 16385 // 2
    assert bench.visible_pairs(8, 16) == bench.visible_pairs(8, None)  # window >= T is full attention
    ratios = bench.flop_ratios(cfg, 16384)
    assert ratios["attention_ideal"] < ratios["attention_kernel"] < ratios["layer"] < 0.25


def test_cli_rejects_unknown_preset():
    command = [sys.executable, "-m", "train.bench", "forward", "--config", "no-such-preset", "--seq", "128"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown preset 'no-such-preset'" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("flag", ["--seq", "--batch", "--repeats", "--layer-seq"])
def test_cli_rejects_non_positive_sizes(flag, capsys):
    from train import bench as cli

    args = {"--seq": "128", flag: "0"}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["forward", "--config", "tiny-hybrid", *(x for kv in args.items() for x in kv)])
    assert exit_info.value.code == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_library_rejects_non_positive_seq():
    with pytest.raises(ValueError, match="seq must be >= 1"):
        bench.forward(config.preset("tiny-hybrid"), seq=0)


# ---------------------------------------------------------------------------------------------------------------
# the attention-scaling benchmark


def test_attention_bench_tiny():
    # tiny-v4 as is (window 8, block 16, ratios 4 / 16, top-3): M gets MLA sizes derived from head_dim 32. C and H
    # run W's window branch too; W alone would add ~8 s of compiles.
    result = bench.attention(config.preset("tiny-v4"), "MCH", [128, 64], repeats=1)
    assert result["kinds"] == ["M", "C", "H"] and result["seqs"] == [64, 128]
    assert {(row["kind"], row["seq"]) for row in result["layers"]} == {(k, t) for k in "MCH" for t in (64, 128)}
    assert all(row["repeats"] == 1 and len(row["times_s"]) == 1 for row in result["layers"])
    assert (result["settings"]["kv_lora_rank"], result["settings"]["qk_nope_head_dim"],
            result["settings"]["v_head_dim"]) == (32, 16, 16)  # tiny-v3's
    assert result["growth"].keys() == {"M", "C", "H"}
    for g in result["growth"].values():
        assert (g["from_seq"], g["to_seq"], g["linear"], g["quadratic"]) == (64, 128, 2, 4)
        assert g["verdict"] in ("linear-ish", "super-linear", "quadratic-ish")
        assert 1 < g["flops"] <= 4
    numbers = list(_numbers({k: result[k] for k in ("layers", "growth")}))
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert all(row["compile_s"] > 0 and row["step_s"] > 0 for row in result["layers"])
    table = bench.attention_markdown(result)
    assert "| M |" in table and "| H |" in table and "128/64 time" in table and "- C: " in table


def test_attention_config_derives_mla_sizes_and_applies_settings():
    derived = bench.attention_config(config.preset("tiny-v4"), "MSWCH")
    assert (derived.kv_lora_rank, derived.qk_nope_head_dim, derived.v_head_dim) == (32, 16, 16)  # tiny-v3's
    cfg = bench.attention_config(config.preset("tiny-v4"), "MSWCH", **bench.ATTENTION_SETTINGS)
    assert (cfg.sliding_window, cfg.attention_block_size, cfg.csa_compress_ratio, cfg.hca_compress_ratio,
            cfg.index_topk) == (128, 128, 4, 128, 512)
    assert (cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim) == (512, 64, 128)  # V4-Flash's
    assert (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim) == (512, 128, 128)  # V3's
    kept = bench.attention_config(config.preset("tiny-hybrid"), "MS")  # an MLA preset keeps its own sizes
    assert (kept.kv_lora_rank, kept.sliding_window) == (32, 16)
    with pytest.raises(ValueError, match="no V4 attention sizes"):
        bench.attention_config(config.preset("tiny-v3"), "W")


def test_benchmark_settings_keep_v4_flash_proportions():
    """Per query, the sparse attention (window + top-k entries, every head) and the indexer's scan of every visible
    entry cost what they do in V4-Flash over its 16x more heads; so do the hidden and q-LoRA widths."""
    cfg = bench.attention_config(config.preset("tiny-v4"), "WCH", **bench.ATTENTION_SETTINGS)
    flash = config.preset("deepseek-v4-flash")
    heads = flash.num_attention_heads // cfg.num_attention_heads
    assert heads == flash.index_n_heads // cfg.index_n_heads == 16
    for context in (2048, 32768):
        ours, theirs = (cost.attention_keys(c, config.AttentionKind.CSA, context) for c in (cfg, flash))
        assert ours == theirs  # (window + top-k, scanned entries) per query
        core = [cost.attention_core_flops(c, config.AttentionKind.CSA, context) for c in (cfg, flash)]
        assert core[1] == heads * core[0]
    assert (cfg.hidden_size * heads, cfg.q_lora_rank * heads) == (flash.hidden_size, flash.q_lora_rank)


def test_flops_ratios_at_the_benchmark_settings():
    # By the cost model W grows linearly and M quadratically; H (every one of the t / 128 visible entries) and C
    # (the indexer's scan of the t / 4) a little faster than linear at V4's proportions, below 1.5x linear.
    cfg = bench.attention_config(config.preset("tiny-v4"), "MWCH", **bench.ATTENTION_SETTINGS)
    ratio = {k: bench.flops_ratio(cfg, config.AttentionKind(k), 8192, 32768) for k in "MWCH"}
    assert 3.9 < ratio["W"] < 4.1 < ratio["H"] < ratio["C"] < 6
    assert 14 < ratio["M"] < 16


def test_interleaved_timing_caps_slow_runs_and_goes_round_robin():
    import time

    calls = []

    def run(name, seconds):
        def call():
            calls.append(name)
            time.sleep(seconds)
            return 0
        return call, ()

    times = bench.interleaved_seconds([run("fast", 0.0), run("slow", 0.05)], repeats=3, budget_s=0.12)
    assert [len(t) for t in times] == [3, 2]  # warm-up 0.05 s: 3 calls would pass 0.12 s, 2 do not
    assert calls == ["fast", "slow", "fast", "slow", "fast", "slow", "fast"]  # warm-ups, then rounds


def test_growth_verdicts():
    assert bench._growth(1.0, 5.0, 8192, 32768)["verdict"] == "linear-ish"
    assert bench._growth(1.0, 7.0, 8192, 32768)["verdict"] == "super-linear"
    assert bench._growth(1.0, 14.0, 8192, 32768)["verdict"] == "quadratic-ish"


@pytest.mark.parametrize("args, message", [
    (["--kinds", "M,X"], "unknown attention kind 'X'"),
    (["--kinds", "M,,S"], "unknown attention kind ''"),
    (["--seq", "2048,0"], "--seq lengths must be >= 1, got 0"),
    (["--seq", "-5"], "--seq lengths must be >= 1, got -5"),
    (["--seq", "2k"], "--seq must be comma-separated integers"),
    (["--window", "0"], "--window must be >= 1"),
    (["--config", "tiny-v3", "--kinds", "W"], "no V4 attention sizes"),
    (["--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
])
def test_attention_cli_rejects_bad_input(args, message, capsys):
    from train import bench as cli

    base = {"--seq": "2048"}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attention", *(x for kv in base.items() for x in kv if kv[0] not in args), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_library_rejects_bad_attention_input():
    with pytest.raises(ValueError, match="seq must be >= 1"):
        bench.attention(config.preset("tiny-v4"), "W", [0, 64])
    with pytest.raises(ValueError, match="unknown attention kind 'Q'"):
        bench.parse_kinds("M,Q")
