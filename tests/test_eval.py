"""Periodic eval (`train.eval_every`): `step.jit_eval_step` on a context-split mesh equals one device; `loop.train`
logs the token-weighted `eval_loss` every `eval_every` steps and at the last, equal to evaluating that step's
checkpoint independently, and trains exactly as with eval off.

Kept cheap (the compiles dominate): a 1-layer tiny-v4 (W + MTP) for the mesh, a 1-layer dense tiny-v3 without MTP
(MTP would double the loop's compile time; the mesh test and `average_eval`'s cover `mtp_loss`) trained with AdamW
for the loop."""

import json

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from v4jax.config import preset
from v4jax.sharding import make_mesh
from v4jax.training import checkpoint, data, loop, optimizer, overrides, step
from v4jax.training.config import RunConfig, TrainConfig

STEPS, EVERY, EVAL_BATCHES = 5, 2, 2


def test_eval_step_with_context_4_equals_one_device():
    """tiny-v4 cut to one window layer (and its MTP block): eval on data=2 x context=4 equals one device."""
    cfg = preset("tiny-v4", pattern="W", capacity_factor=None)
    run = RunConfig(model=cfg, train=TrainConfig(batch_size=4, seq_len=64))
    opt = optax.sgd(0.1)
    batch = data.synthetic("copy", cfg.vocab_size, 64, seed=0, batch_size=4, symbols=16, split="eval").batch(0)
    single = step.init_state(run, opt, jax.random.key(0))
    want = step.jit_eval_step(run, single)(single, batch)

    mesh = make_mesh(data=2, context=4)
    assert step.batch_sharding(mesh).spec == P("data", "context")
    shardings = jax.tree.map(lambda a: a.sharding, step.abstract_state(run, opt, mesh))
    sharded = jax.device_put(single, shardings)  # the same parameters, laid out as training on the mesh has them
    lowered = step.jit_eval_step(run, sharded, mesh).lower(sharded, batch)
    assert "collective_permute" in lowered.as_text()  # the sequence really is split (the window halo exchange)
    got = lowered.compile()(sharded, batch)
    got, want = jax.device_get((got, want))
    assert {"loss", "mtp_loss"} <= want.keys()
    for name in ("loss", "mtp_loss", "tokens"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)


def test_average_eval_weights_by_tokens():
    masks = [np.array([[1, 1, 1, 0]]), np.array([[1, 0, 0, 0]])]  # 3 and 1 tokens; 2 and 0 MTP pairs
    got = loop.average_eval([{"loss": 1.0, "mtp_loss": 2.0}, {"loss": 5.0, "mtp_loss": 0.0}], masks)
    assert got == {"loss": (3 * 1.0 + 5.0) / 4, "mtp_loss": 2.0, "tokens": 4}


def test_bad_eval_settings_fail_before_anything_is_written(tmp_path):
    run = overrides.apply(overrides.load_config("tiny_v3"), ["train.data=synthetic:counting:16",
                                                             "train.eval_every=2", "train.eval_batches=0"])
    with pytest.raises(ValueError, match="eval_batches: must be >= 1"):
        loop.train(run, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# the loop


def _corpus(root):
    """Byte-token shards of many short documents: rows hold 0-3 document ends, so the held-out rows' loss masks
    count different numbers of tokens and the token weighting matters."""
    rng = np.random.default_rng(0)
    docs = root / "docs"
    docs.mkdir()
    for i in range(1200):
        words = rng.choice(["def", "return", "x", "+", "1", "(", ")", ":", "\n", "    "], rng.integers(3, 12))
        (docs / f"{i:04d}.py").write_text(" ".join(words))
    data.prepare([docs], root / "tokens", "bytes")
    return root / "tokens"


def _run_config(corpus, eval_every):
    return overrides.apply(overrides.load_config("tiny_v3"), [
        "model.num_hidden_layers=1", "model.pattern=M", "model.first_dense_layers=1",
        "model.num_nextn_predict_layers=0", f"train.data={corpus}", "train.optimizer=adamw",
        f"train.steps={STEPS}", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=1",
        "train.log_every=1", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=0",
        f"train.eval_every={eval_every}", f"train.eval_batches={EVAL_BATCHES}"])


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restore(run, workdir, at):
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    with checkpoint.Checkpointer(workdir, run.to_dict()) as ckpt:
        return ckpt.restore(step.abstract_state(run, opt), step=at)[0]


def _token_sums(run):
    """The loss's own sums (cross-entropy, MTP) over each eval batch, from `step.losses` directly."""
    cfg = step.model_config(run)
    return jax.jit(lambda state, batch: step.losses(cfg, run.train, state.model_state, batch, 1.0)[1][0])


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    corpus = _corpus(base)
    runs = {}
    for every in (EVERY, 0):
        run = _run_config(corpus, every)
        loop.train(run, base / f"every{every}", progress=False)
        runs[every] = (run, base / f"every{every}")
    return runs


def test_eval_is_logged_and_equals_the_checkpoint_evaluated_independently(loop_runs):
    run, workdir = loop_runs[EVERY]
    evals = {r["step"]: r for r in _records(workdir) if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 5]  # every 2 steps and the last
    assert all("loss" not in r and "eval_mtp_loss" not in r for r in evals.values())  # own records; no MTP
    batches = [data.make_dataset(run.train, run.model.vocab_size, split="eval").batch(i) for i in range(EVAL_BATCHES)]
    counts = [int(b["loss_mask"].sum()) for b in batches]
    assert len(set(counts)) > 1, counts  # a plain mean of the batch means would be wrong
    sums = _token_sums(run)
    for at, record in evals.items():
        state = _restore(run, workdir, at)
        parts = jax.device_get([sums(state, b) for b in batches])
        total = {k: sum(float(p[k]) for p in parts) for k in ("ce_sum", "tokens")}
        assert record["eval_tokens"] == total["tokens"] == sum(counts)
        np.testing.assert_allclose(record["eval_loss"], total["ce_sum"] / total["tokens"], rtol=1e-6)
    assert evals[5]["eval_loss"] < evals[2]["eval_loss"]  # it learns


def test_eval_does_not_change_training(loop_runs):
    (run, with_eval), (run_off, without) = loop_runs[EVERY], loop_runs[0]
    train = [[(r["step"], r["loss"], r["grad_norm"]) for r in _records(d) if "loss" in r] for d in (with_eval, without)]
    assert train[0] == train[1] and len(train[0]) == STEPS
    assert not [r for r in _records(without) if "eval_loss" in r]
    a, b = (jax.tree.leaves(_restore(r, d, STEPS)) for r, d in ((run, with_eval), (run_off, without)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
