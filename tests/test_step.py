"""The train step: loss falls, accumulation equals the full batch, the router bias update follows the loads.

One small MoE config (2 layers) keeps the compile of the gradient short; the V4 paths are covered by the model
and oracle tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import config
from v4jax.training import data, optimizer, step
from v4jax.training.config import RunConfig, TrainConfig

CFG = config.preset("tiny-v3", num_hidden_layers=2, first_dense_layers=0, num_nextn_predict_layers=1,
                    vocab_size=64)


def run_config(**train) -> RunConfig:
    fields = dict(batch_size=4, seq_len=16, steps=40, warmup_steps=2, learning_rate=1e-2, optimizer="adamw")
    return RunConfig(CFG, TrainConfig(**(fields | train)))


def batches(run: RunConfig, task: str = "counting"):
    it = data.synthetic(task, CFG.vocab_size, run.train.seq_len, seed=0, batch_size=run.train.batch_size,
                        symbols=16)
    return [jax.tree.map(jnp.asarray, it.batch(k)) for k in range(run.train.steps)]


@functools.cache
def compiled(run: RunConfig):
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    state = step.init_state(run, opt, jax.random.key(0))
    return opt, state, jax.jit(functools.partial(step.train_step, run=run, optimizer=opt))


def test_loss_falls_on_a_synthetic_task():
    run = run_config()
    _, state, train = compiled(run)
    losses = []
    for batch in batches(run):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    assert int(state.step) == run.train.steps


def test_two_micro_batches_equal_one_full_batch():
    full_run, micro_run = run_config(), run_config(grad_accumulation=2)
    batch = batches(full_run)[0]
    _, state, full = compiled(full_run)
    _, _, micro = compiled(micro_run)
    copy = functools.partial(jax.tree.map, jnp.copy)
    a, ma = full(copy(state), batch)
    b, mb = micro(copy(state), batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_router_bias_update_moves_each_bias_against_its_load():
    """bias += rate * sign(mean load - load) per MoE layer, from the loads the step itself measured."""
    run = run_config(router_bias_update_rate=0.05, learning_rate=1e-9)
    _, state, train = compiled(run)
    before = jax.tree.map(np.asarray, state.extras)
    state, metrics = train(state, batches(run)[0])
    load = np.asarray(metrics["expert_load"])  # rows: unit layers 0, 1, then MTP
    expected = 0.05 * np.sign(load.mean(-1, keepdims=True) - load)
    unit = np.asarray(state.extras["unit"]["blocks"][0]["mlp"]["router"]["bias"][...])
    unit_before = before["unit"]["blocks"][0]["mlp"]["router"]["bias"][...]
    np.testing.assert_allclose(unit - unit_before, expected[:2], atol=1e-7)
    mtp = np.asarray(state.extras["mtp"]["block"]["mlp"]["router"]["bias"][...])
    np.testing.assert_allclose(mtp - before["mtp"]["block"]["mlp"]["router"]["bias"][...], expected[2], atol=1e-7)
    assert np.abs(expected).sum() > 0


def test_bias_update_lowers_load_imbalance_on_a_skewed_router():
    """A skewed router: biases +1 on experts 0 and 1, so every token picks them (max/mean load = E/k = 4), and gate
    weights scaled x10 so that, as in a trained router, the scores vary across tokens by more than one bias step.
    Repeated train steps, with a learning rate too small to move the weights, rebalance the load through the bias
    update alone (each step closes the favourites' lead by 2 x 0.05)."""
    from flax import nnx

    from v4jax.moe.routing import RouterBias

    run = run_config(router_bias_update_rate=0.05, learning_rate=1e-9)  # the program the test above compiled
    _, state, train = compiled(run)
    skew = jnp.zeros(CFG.n_routed_experts).at[:2].set(1.0)
    extras = nnx.map_state(lambda _, v: v.replace(v[...] + skew) if isinstance(v, RouterBias) else v, state.extras)
    params = nnx.map_state(lambda path, v: v.replace(v[...] * 10) if path[-2:] == ("router", "weight") else v,
                           state.params)
    state = state.replace(params=params, extras=extras)
    imbalance = []  # per step: the worst layer's busiest-expert load / mean load
    for batch in batches(run)[:24]:
        state, metrics = train(state, batch)
        load = np.asarray(metrics["expert_load"])
        imbalance.append(float((load.max(-1) / load.mean(-1)).max()))
    assert imbalance[0] == 4.0, imbalance  # skewed to start with
    # measured: ~1.5 over the last 8 steps (64 tokens x top-2 over 8 experts: sampling noise keeps it above 1)
    assert np.mean(imbalance[-8:]) < 2.0 and max(imbalance[-8:]) < 2.5, imbalance
    unit = np.asarray(state.extras["unit"]["blocks"][0]["mlp"]["router"]["bias"][...])
    assert (unit[:, :2].mean(-1) - unit[:, 2:].mean(-1) < 0.5).all()  # the favourites' lead of 1 has shrunk


def test_moe_rows_follow_depth_order():
    cfg = config.preset("tiny-v4")
    rows = step.moe_rows(cfg)
    assert list(rows) == list(range(cfg.num_hidden_layers + 1)) and rows[cfg.num_hidden_layers] == 7


def test_train_state_lives_on_the_mesh_and_matches_its_restore_target():
    """Every leaf (scalar step, rng and optimizer counts included) sits on the whole mesh, as a jit over the mesh
    and a checkpoint restore into `abstract_state` both require."""
    from v4jax import sharding

    run = run_config(optimizer="muon")
    mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
    opt = optimizer.make_optimizer(run.train, accumulate=False)
    state = step.init_state(run, opt, jax.random.key(0), mesh=mesh)
    target = step.abstract_state(run, opt, mesh)
    devices = set(mesh.devices.flat)
    for leaf, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert leaf.sharding.device_set == devices
        assert leaf.sharding.is_equivalent_to(abstract.sharding, leaf.ndim)
