"""`python -m train.train` bad input: one line on stderr, exit code 2, nothing written; `--set` parsing."""

import pytest

from train import train as cli
from v4jax.training import overrides


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope"], "unknown config 'nope'"),
    (["--config", "tiny_v3", "--set", "train.lr=1"], "TrainConfig has no field 'lr'"),
    (["--config", "tiny_v3", "--set", "train.steps=abc"], "'abc' is not a valid int"),
    (["--config", "tiny_v3", "--set", "model.window=0"], "ModelConfig has no field 'window'"),
    (["--config", "tiny_v3", "--set", "model.sliding_window=0"], "ModelConfig.sliding_window"),
    (["--config", "tiny_v3", "--set", "steps=3"], "expected model.<field>=<value>"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--workdir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_incompatible_workdir_is_refused(tmp_path, capsys):
    from v4jax.training import checkpoint

    run = overrides.load_config("tiny_v3")
    checkpoint.write_config(tmp_path, run.to_dict())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny_v3", "--workdir", str(tmp_path), "--set", "model.hidden_size=32",
                  "--set", "model.num_attention_heads=2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "model.hidden_size" in err, err


def test_set_parses_by_field_type():
    run = overrides.apply(overrides.load_config("tiny_v4"), [
        "train.learning_rate=1e-4", "train.steps=7", "model.pattern=WCH", "train.optimizer=adamw",
        "model.swiglu_limit=none", "model.norm_topk_prob=false"])
    assert run.train.learning_rate == 1e-4 and run.train.steps == 7 and run.train.optimizer.value == "adamw"
    assert run.model.num_hidden_layers == 3 and run.model.swiglu_limit is None and not run.model.norm_topk_prob
