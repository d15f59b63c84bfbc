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


def _token_dir(root, corrupt_id: int | None = None):
    """A prepared byte-token directory; `corrupt_id` overwrites its third token (a shard holding a bad id)."""
    from v4jax.training import data

    (root / "doc.txt").write_text("def f(x):\n    return x + 1\n")
    out = root / "tokens"
    data.prepare([root / "doc.txt"], out, "bytes")
    if corrupt_id is not None:
        shard = out / "tokens-00000.bin"
        tokens = bytearray(shard.read_bytes())
        tokens[4:6] = corrupt_id.to_bytes(2, "little")  # uint16 shards
        shard.write_bytes(bytes(tokens))
    return out


@pytest.mark.parametrize("case, sets, message", [
    ("missing", [], "does not exist"),
    ("bad ids", [], "token id 1000 >= vocab_size 512"),
    ("small vocab", ["model.vocab_size=200"], "has 259 token ids but the model's vocab_size is 200"),
])
def test_bad_data_path_is_one_line_and_exit_2(tmp_path, capsys, case, sets, message):
    path = tmp_path / "nowhere" if case == "missing" else _token_dir(tmp_path, 1000 if case == "bad ids" else None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny_v3", "--set", f"train.data={path}", *(a for s in sets for a in ("--set", s)),
                  "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("python -m train.train: error: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost:1234"], "--coordinator, --num-processes and --process-id need --multihost"),
    (["--process-id", "0"], "need --multihost"),
    (["--multihost", "--num-processes", "2", "--process-id", "0"], "give all three or none"),
    (["--multihost", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "coordinator must be HOST:PORT, got 'localhost'"),
    (["--multihost", "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "process id must be in [0, 2) for 2 processes, got 2"),
])
def test_bad_multihost_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    """Refused before jax.distributed.initialize is called (this process stays a single-process JAX)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", "tiny_v3", "--workdir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
