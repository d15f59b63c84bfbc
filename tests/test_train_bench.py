"""`python -m train.bench train`: the printout and the JSON of a 2-step run of a tiny config, and its bad input."""

import json

import pytest

from train import bench as cli

TINY = ["model.num_hidden_layers=1", "model.pattern=M", "model.first_dense_layers=1", "model.vocab_size=64",
        "model.num_nextn_predict_layers=0", "train.data=synthetic:counting:16", "train.seq_len=16",
        "train.batch_size=4", "train.optimizer=adamw"]


def test_train_bench_reports_sane_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["train", "--config", "tiny_v3", "--steps", "2", "--json", str(out),
                     *(a for s in TINY for a in ("--set", s))]) == 0
    printed = capsys.readouterr().out
    for label in ("step time", "tokens/s", "MFU", "peak", "measured in this run"):
        assert label in printed, printed
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and len(result["step_times_s"]) == 2 and result["tokens_per_step"] == 4 * 16
    assert 0 < result["step_time_s"] and result["tokens_per_s"] == pytest.approx(64 / result["step_time_s"])
    assert result["flops_per_step"] > 0 and result["peak_flops"] > 1e8  # any CPU does 0.1 GFLOP/s
    assert 0 < result["mfu"] <= 1
    assert result["mfu"] == pytest.approx(result["flops_per_step"] / result["step_time_s"] / result["peak_flops"])
    assert f"{100 * result['mfu']:.1f}%" in printed


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "tiny_v3", "--set", "train.lr=1"], "TrainConfig has no field 'lr'"),
    (["--config", "tiny_v3", "--set", "train.data=/nowhere"], "does not exist"),
    (["--config", "tiny_v3", "--steps", "0"], "--steps must be >= 1"),
])
def test_train_bench_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["profile", "--config", "nope", "--out", "/tmp/x"], "unknown config 'nope'"),
    (["profile", "--config", "tiny_v3", "--out", "/tmp/x", "--depth", "0"], "--depth and --rows must be >= 1"),
    (["profile", "--config", "tiny_v3", "--out", "/dev/null/x"], "--out '/dev/null/x'"),
    (["compare", "--config", "tiny_v3", "--b", "train.lr=1"], "TrainConfig has no field 'lr'"),
    (["compare", "--config", "tiny_v3", "--steps", "0"], "--steps must be >= 1"),
])
def test_profile_and_compare_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
