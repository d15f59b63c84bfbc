"""The MoE dispatch benchmark on a tiny layer over the 8-device mesh: every impl measured with sane figures, skips
that say why, and the `python -m train.bench moe` command line (JSON, fake devices of its own, bad input)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from train import bench as cli
from v4jax import sharding
from v4jax.config import MoeImpl
from v4jax.moe import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"hidden": 32, "experts": 8, "topk": 2, "width": 16}
EP = {"ep_a2a", "ep_ragged", "ep_psum"}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(data=2, expert=4)


@pytest.fixture(scope="module")
def result(mesh):
    return bench.moe(bench.moe_config(**TINY), bench.IMPLS, [256], mesh, repeats=2, budget_s=None)


def test_every_impl_measured_with_sane_figures(result):
    rows = {row["impl"]: row for row in result["rows"]}
    assert list(rows) == [i.value for i in bench.IMPLS] == ["dense", "einsum", "ragged", "ep_a2a", "ep_ragged",
                                                            "ep_psum"]
    assert result["batch_rows"] == 8 and result["mesh"] == {"data": 2, "expert": 4} and result["devices"] == 8
    assert result["ragged_all_to_all"] == "emulated"  # XLA:CPU
    for impl, row in rows.items():
        assert row["tokens"] == 256 and row["resolved"] == impl and "skipped" not in row
        assert row["forward_s"] > 0 and row["train_s"] > 0, row
        assert len(row["forward_times_s"]) == len(row["train_times_s"]) == 2
        for key in ("memory_forward", "memory_train"):
            m = row[key]
            assert m["temp_bytes"] > 0 and m["argument_bytes"] > 0 and m["output_bytes"] > 0
            assert m["total_bytes"] == m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
        # fwd+bwd returns the gradients of the expert weights too
        assert row["memory_train"]["output_bytes"] > row["memory_forward"]["output_bytes"]
        assert 0 <= row["dropped_fraction"] <= 1
        assert (row["a2a_bytes"] > 0) == (impl in {"ep_a2a", "ep_ragged"}), (impl, row["a2a_bytes"])
        assert row["check"]["tokens"] > 0 and row["check"]["max_abs_diff"] < 1e-4, (impl, row["check"])
        assert row["versus"] == "ep_a2a" and row["forward_ratio"] > 0 and row["train_ratio"] > 0
        assert ("exchange" in row) == (impl == "ep_ragged")
    assert rows["ep_a2a"]["forward_ratio"] == rows["ep_a2a"]["train_ratio"] == 1.0
    assert rows["dense"]["dropped_fraction"] == rows["ragged"]["dropped_fraction"] == 0  # dropless
    assert rows["ep_ragged"]["exchange"] == "emulated"
    json.dumps(result)  # JSON-able as is


def test_markdown_one_row_per_impl_and_tokens(result):
    table = bench.markdown(result)
    for impl in bench.IMPLS:
        assert sum(line.startswith(f"| {impl.value} | 256 |") for line in table.splitlines()) == 1, table
    assert "| emulated |" in table and "exchange emulated" in table
    assert "ref: ep_a2a" in table and "skipped" not in table.lower()


def test_skips_say_why(mesh, monkeypatch):
    monkeypatch.setattr(bench, "DENSE_LIMIT_BYTES", 1)  # dense: skipped before compiling
    result = bench.moe(bench.moe_config(**TINY), [MoeImpl.DENSE, MoeImpl.EINSUM], [64], mesh, repeats=1,
                       memory_limit_bytes=1, check=False)
    dense, einsum = result["rows"]
    assert dense["skipped"].startswith("would need") and "memory_forward" not in dense
    assert "per device x 8 devices" in einsum["skipped"] and einsum["memory_forward"]["total_bytes"] > 0
    assert "forward_s" not in einsum
    table = bench.markdown(result)
    assert "Skipped dense at 64" in table and "Skipped einsum at 64" in table
    assert "| dense | 64 | skipped | skipped |" in table


def test_parsers():
    assert bench.parse_impls("all") == bench.IMPLS
    assert bench.parse_impls("einsum, ep_a2a,einsum") == (MoeImpl.EINSUM, MoeImpl.EP_A2A)
    with pytest.raises(ValueError, match="unknown moe impl 'bogus'"):
        bench.parse_impls("einsum,bogus")
    assert bench.parse_capacity("exact") is None and bench.parse_capacity("1.5") == 1.5
    with pytest.raises(ValueError, match="capacity factor"):
        bench.parse_capacity("0")


def test_cli_json_on_its_own_fake_devices(tmp_path):
    out = tmp_path / "moe.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the command must ask for its 8 devices
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "train.bench", "moe", "--impl", "einsum,ep_ragged", "--tokens", "64,128",
               "--hidden", "16", "--experts", "8", "--topk", "2", "--width", "8", "--capacity-factor", "exact",
               "--repeats", "1", "--json", str(out)]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["layer"]["capacity_factor"] is None
    assert [(r["impl"], r["tokens"]) for r in result["rows"]] == [("einsum", 64), ("ep_ragged", 64),
                                                                  ("einsum", 128), ("ep_ragged", 128)]
    assert all(r["dropped_fraction"] == 0 for r in result["rows"])  # exact capacity drops nothing
    assert all(r["versus"] == "einsum" for r in result["rows"])  # no ep_a2a: the ratios are to einsum
    for impl, tokens in [("einsum", 64), ("ep_ragged", 64), ("einsum", 128), ("ep_ragged", 128)]:
        assert f"| {impl} | {tokens} |" in done.stdout
    assert "exchange emulated" in done.stdout and "timing forward" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--impl", "bogus"], "--impl: unknown moe impl 'bogus'"),
    (["--tokens", "100"], "--tokens must be multiples of 8"),
    (["--tokens", "0"], "--tokens lengths must be >= 1"),
    (["--mesh", "data=2,expert=x"], "--mesh: expected axis=size"),
    (["--mesh", "data=2,foo=4"], "--mesh: unknown axis 'foo'"),
    (["--mesh", "data=4,expert=4"], "needs 16 devices but only 8"),
    (["--experts", "6"], "--experts 6 do not split over the mesh's expert axis of size 4"),
    (["--capacity-factor", "-1"], "--capacity-factor: capacity factor must be a number > 0 or 'exact'"),
    (["--topk", "100"], "ModelConfig.num_experts_per_tok"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--config", "nope"], "unknown preset 'nope'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["moe", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
