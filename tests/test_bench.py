"""The forward benchmark: a tiny run returns every figure as a positive finite number; bad CLI input exits 2."""

import math
import pathlib
import subprocess
import sys

import pytest

from v4jax import bench, config

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
