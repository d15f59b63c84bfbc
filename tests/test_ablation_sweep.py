"""Ablation sweeps: variant generation, the parameter-match and reach checks, a tiny sweep end to end through the
normal training loop into CSV + report, restart skipping, and the CPU sweep's ranking in a reduced form."""

import csv
import dataclasses

import jax
import pytest

from v4jax.ablation import report, sweep
from v4jax.training.config import RunConfig


def test_place_and_ratio_grid():
    assert sweep.place(4, 1, "even") == "SSSM"
    assert sweep.place(4, 2, "even") == "SMSM"
    assert sweep.place(6, 2, "front") == "MMSSSS"
    assert sweep.place(6, 2, "back") == "SSSSMM"
    assert sweep.place(5, 1, "middle") == "SSMSS"
    assert sweep.place(4, 1, "even", cheap="W", full_letter="C") == "WWWC"
    grid = sweep.ratio_grid(4, [0, 1, 4], ["even", "front"], sliding_window=[8, 16])
    assert [v.label for v in grid] == [f"{p} sliding_window={w}" for p in ("SSSS", "SSSM", "MSSS", "MMMM")
                                       for w in (8, 16)]
    assert grid[1].run_name == "SSSS-sliding_window=16"
    with pytest.raises(ValueError, match="cannot place 5"):
        sweep.place(4, 5, "even")


def smoke() -> sweep.Sweep:
    return sweep.load("ablate_smoke")


def test_sweep_validates_before_training():
    base = smoke()
    with pytest.raises(ValueError, match="lists a variant twice"):
        dataclasses.replace(base, variants=base.variants[:1] * 2)
    with pytest.raises(ValueError, match="must be an ablation task"):
        dataclasses.replace(base, base=RunConfig(base.base.model, dataclasses.replace(base.base.train, data="stdlib")))
    with pytest.raises(ValueError, match="unknown layer letter"):
        dataclasses.replace(base, variants=sweep.variants(["SSXM"]))
    with pytest.raises(ValueError, match="unknown sweep 'nope'"):
        sweep.load("nope")


def test_parameter_counts_are_checked_and_printed():
    base = smoke()
    lines = sweep.check_params(base)
    assert any("SSSS" in line and "4:0" in line for line in lines)
    assert "differ by 0.0%" in lines[-1]
    mixed = dataclasses.replace(base, variants=sweep.variants(["SSSM", "CCCC"]), param_tolerance=0.05)
    with pytest.raises(ValueError, match=r"parameter counts differ by \d+\.\d% > 5%"):
        sweep.check_params(mixed)
    assert "tolerance off" in sweep.check_params(dataclasses.replace(mixed, param_tolerance=None))[-1]


def test_reach_flags_a_gap_inside_the_local_span():
    base = smoke()
    assert not any("warning" in line for line in sweep.reach(base))
    wide = dataclasses.replace(base, variants=sweep.variants(["SSSM"], sliding_window=[64]))
    assert any("warning: SSSM sliding_window=64" in line for line in sweep.reach(wide))


def test_tiny_sweep_end_to_end_then_restart_skips(tmp_path, capsys):
    base = smoke()
    logged = []
    path = sweep.run(base, tmp_path, log=logged.append)
    rows = list(csv.DictReader(open(path)))
    assert [r["run"] for r in rows] == ["SSSS-s0", "SSSM-s0"]
    for row in rows:
        assert int(row["steps"]) == base.base.train.steps
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert row["task"] == "mqar:keys=8,values=8,stride=1,bound=1"
    sliding, full = rows
    assert (sliding["ratio"], full["ratio"]) == ("4:0", "3:1")
    assert float(sliding["kv_bytes_per_token_1m"]) < float(full["kv_bytes_per_token_1m"])
    # the M layer caches every token; the S layers only their window, so at 1M the M layer dominates
    assert float(full["kv_bytes_per_token_1m"]) == pytest.approx((32 + 8) * 2, rel=0.01)

    paths = report.write_report(path, tmp_path)
    table = paths["table"].read_text()
    assert "| SSSS" in table and "| SSSM" in table and "accuracy_vs_kv.png" in table
    for key in ("kv_plot", "ratio_plot"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"

    from train import ablate  # the CLI on the finished sweep: nothing to train, the report re-made

    assert ablate.main(["--sweep", "ablate_smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 runs already in" in out and "| SSSM" in out and "accuracy_vs_ratio.png" in out

    logged.clear()
    again = dataclasses.replace(base, seeds=(0, 1), variants=base.variants[:1])
    sweep.run(again, tmp_path, log=logged.append)
    assert any("1 runs already in" in line for line in logged)
    assert [r["run"] for r in csv.DictReader(open(path))] == ["SSSS-s0", "SSSM-s0", "SSSS-s1"]


def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path):
    from train import ablate

    for argv, message in ((["--sweep", "nope"], "unknown sweep"),
                          (["--sweep", "ablate_smoke", "--set", "train.nope=1"], "no field"),
                          (["--sweep", "ablate_smoke", "--report-only", "--out", str(tmp_path)], "no ")):
        with pytest.raises(SystemExit) as exit_info:
            ablate.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_cpu_sweep_ranking_holds_in_reduced_form(tmp_path):
    """The CPU sweep's claim, reduced to run in about two minutes: on beyond-window MQAR a stack with one full layer
    (first) is near perfect and the all-sliding stack near chance (1/8), on each of two seeds."""
    full = sweep.load("ablate_cpu")
    train = dataclasses.replace(full.base.train, steps=150)
    reduced = dataclasses.replace(full, base=RunConfig(full.base.model, train),
                                  variants=sweep.variants(["SSSS", "MSSS"]), eval_rows=128)
    logged = []
    rows = list(csv.DictReader(open(sweep.run(reduced, tmp_path, log=logged.append))))
    assert not any("warning" in line for line in logged)
    accuracy = {(r["label"], int(r["seed"])): float(r["accuracy"]) for r in rows}
    for seed in (0, 1):
        assert accuracy["MSSS", seed] > 0.9, accuracy
        assert accuracy["SSSS", seed] < 0.25, accuracy


def test_shared_compiles_leave_no_persistent_cache_behind(tmp_path):
    """The sweep's cache is for the sweep: JAX opens its persistent cache once per process and keeps it whatever
    the settings say later, so the sweep must close it again."""
    from jax._src import compilation_cache as cc

    assert jax.config.jax_compilation_cache_dir is None
    with sweep._shared_compiles(tmp_path / "cache"):
        jax.jit(lambda x: x * 3.0 + 1.0).lower(jax.numpy.ones(7)).compile()
        assert cc._cache_initialized and cc._cache is not None  # opened on the sweep's directory
    assert jax.config.jax_compilation_cache_dir is None
    assert not cc._cache_initialized and cc._cache is None
