"""`python -m train.generate`: a training checkpoint's parameters generate what `serving.generate` gives for them;
bad input is one line on stderr and exit code 2."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import generate as cli
from v4jax import serving
from v4jax.training import checkpoint, optimizer, overrides, step


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with one checkpoint of the full train state (params, extras, optimizer, rng)."""
    run = overrides.load_config("tiny_v3")
    state = step.init_state(run, optimizer.make_optimizer(run.train, accumulate=False), jax.random.key(7))
    path = tmp_path_factory.mktemp("run")
    with checkpoint.Checkpointer(path, run.to_dict(), async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
    return path, run.model, state.model_state


def run_cli(capsys, argv):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_checkpoint_ids_and_text(workdir, capsys):
    path, cfg, params = workdir
    prompts = [[5, 6, 7], [258, 104, 105], [9], [258, 104, 105]]  # [258, 104, 105] is "hi" after BOS
    # 4 prompts and --max-len 64 give the engine the shapes of tests/test_engine.py and tests/test_server.py, so
    # in one session these programs compile once
    expected = serving.generate(cfg, params, prompts, 4, max_len=64)
    argv = ["--checkpoint", str(path), "--max-tokens", "4", "--max-len", "64", "--ignore-eos"]
    rows = [json.loads(line) for line in run_cli(capsys, [*argv, "--json", "--ids", "5,6,7", "--ids", "258",
                                                          "104", "105", "--ids", "9", "--ids", "258 104 105"])
            .splitlines()]
    assert [r["ids"] for r in rows] == expected and [r["prompt_ids"] for r in rows] == prompts
    plain = run_cli(capsys, [*argv, "--ids", "5 6 7", "--ids", "258,104,105", "--ids", "9", "--ids", "1"])
    assert plain.splitlines()[:3] == [" ".join(map(str, ids)) for ids in expected[:3]]
    text = run_cli(capsys, [*argv, "--step", "3", "--prompt", "hi", "--prompt", "hi", "--prompt", "x",
                            "--prompt", "y"])
    assert text.splitlines()[:2] == [serving.loading.checkpoint_tokenizer({}, cfg).decode(expected[1])] * 2
    assert serving.loading.load(checkpoint=str(path)).cfg == cfg


def test_hf_folder_loads_the_same_parameters(tmp_path, workdir):
    """--hf reads what hf.save wrote (generation from there is the checkpoint path above); bytes without a
    tokenizer.json."""
    from v4jax import hf
    from v4jax.serving import loading

    _, cfg, params = workdir
    hf.save(tmp_path / "model", cfg, params)
    loaded = loading.load(hf=str(tmp_path / "model"))
    assert loaded.name == "model" and type(loaded.tokenizer).__name__ == "ByteTokenizer"
    assert loaded.cfg.replace(name=cfg.name, attention_block_size=cfg.attention_block_size) == cfg
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --checkpoint --hf --preset is required"),
    (["--preset", "tiny-v3"], "one of the arguments --prompt --ids is required"),
    (["--preset", "tiny-v3", "--hf", "x", "--ids", "1"], "not allowed with argument"),
    (["--preset", "tiny-v3", "--ids", "1,a"], "invalid token ids '1,a'"),
    (["--preset", "tiny-v3", "--ids", ","], "--ids: empty prompt"),
    (["--preset", "tiny-v3", "--prompt", ""], "--prompt: empty prompt"),
    (["--preset", "tiny-v3", "--ids", "1", "--max-tokens", "-4"], "--max-tokens must be >= 1"),
    (["--preset", "tiny-v3", "--ids", "1", "--max-tokens", "x"], "invalid int value: 'x'"),
    (["--preset", "tiny-v3", "--ids", "1", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--preset", "tiny-v3", "--ids", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--preset", "tiny-v3", "--ids", "1", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--preset", "nope", "--ids", "1"], "unknown preset 'nope'"),
    (["--checkpoint", "/nonexistent/run", "--ids", "1"], "does not exist"),
    (["--hf", "/nonexistent/model", "--ids", "1"], "does not exist"),
    (["--preset", "tiny-v3", "--ids", "1,512"], "outside the vocabulary [0, 512)"),
    (["--preset", "tiny-v3", "--ids", "1", "--max-tokens", "1024"], "more than the 1024-token context"),
    (["--preset", "tiny-v3", "--prompt", "x" * 40, "--max-len", "32"], "more than the 32-token context"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("python -m train.generate: error:"), err


def test_bad_checkpoint_directories(tmp_path, workdir, capsys):
    for path, message in [(tmp_path, "no config.json"), (workdir[0] / "checkpoints", "no config.json")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--checkpoint", str(path), "--ids", "1"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(workdir[0]), "--step", "9", "--ids", "1"])
    err = capsys.readouterr().err.strip()
    assert "no checkpoint at step 9 (committed: [3])" in err and len(err.splitlines()) == 1


def test_the_module_entry_point_exits_2():
    result = subprocess.run([sys.executable, "-m", "train.generate", "--checkpoint", "/nonexistent/run",
                             "--prompt", "hello"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "python -m train.generate: error: checkpoint directory '/nonexistent/run' does not exist"]


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --checkpoint --hf --preset is required"),
    (["--preset", "tiny-v3", "--port", "-1"], "--port must be >= 0"),
    (["--preset", "tiny-v3", "--port", "70000"], "--port must be <= 65535"),
    (["--preset", "tiny-v3", "--slots", "0"], "--slots must be >= 1"),
    (["--preset", "tiny-v3", "--max-len", "1"], "--max-len must be >= 2"),
    (["--checkpoint", "/nonexistent/run"], "does not exist"),
])
def test_serve_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    from train import serve

    with pytest.raises(SystemExit) as exit_info:
        serve.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("python -m train.serve: error:")
