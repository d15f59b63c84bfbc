"""The optimizer partition (V4 recipe), the Muon update, the schedule, accumulation, and that training descends."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from v4jax import config, model
from v4jax.training import optimizer as opt_lib
from v4jax.training.config import TrainConfig
from v4jax.training.optimizer import ADAMW, MUON


def _flat(tree):
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(tree)}


def _labels(name):
    params = model.abstract(config.preset(name)).filter(nnx.Param)
    labels = {path: var.get_value() for path, var in _flat(opt_lib.partition(params)).items()}
    assert set(labels) == set(_flat(params))
    return params, labels


def _state(**arrays_and_axes):
    """A small nnx.State of Params: name=(array, logical_axes)."""
    return nnx.State({name: nnx.Param(jnp.asarray(a), logical_axes=axes)
                      for name, (a, axes) in arrays_and_axes.items()})


def _cfg(**kw):
    base = dict(learning_rate=1e-2, warmup_steps=0, steps=100, min_learning_rate_ratio=1.0, grad_clip_norm=0.0,
                weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------------------
# partition


def test_partition_tiny_v4():
    params, labels = _labels("tiny-v4")
    expect = {
        "embed/embedding": ADAMW, "head/kernel": ADAMW, "norm/weight": ADAMW,
        "hc_head/fn": MUON, "hc_head/base": ADAMW, "hc_head/scale": ADAMW,
        "prefix/0/attn_hc/fn": MUON, "prefix/0/attn_hc/base": ADAMW, "prefix/0/attn_hc/scale": ADAMW,
        "unit/blocks/0/mlp_hc/fn": MUON, "unit/blocks/0/mlp_hc/base": ADAMW, "unit/blocks/0/mlp_hc/scale": ADAMW,
        "prefix/0/attn/sinks": ADAMW, "unit/blocks/0/attn/sinks": ADAMW, "mtp/block/attn/sinks": ADAMW,
        "prefix/2/attn/compressor/position_bias": ADAMW, "unit/blocks/1/attn/indexer/compressor/position_bias": ADAMW,
        "unit/blocks/0/attn/compressor/norm/weight": ADAMW, "unit/blocks/0/attn/q_norm/weight": ADAMW,
        "unit/blocks/0/attn/kv_norm/weight": ADAMW, "mtp/embed_norm/weight": ADAMW, "mtp/hidden_norm/weight": ADAMW,
        "unit/blocks/0/attn/wq_a": MUON, "unit/blocks/0/attn/wq_b": MUON, "unit/blocks/0/attn/wkv": MUON,
        "unit/blocks/0/attn/wo_a": MUON, "unit/blocks/0/attn/wo_b": MUON, "prefix/0/attn/wq_b": MUON,
        "unit/blocks/0/attn/compressor/wkv": MUON, "unit/blocks/0/attn/compressor/wgate": MUON,
        "unit/blocks/1/attn/indexer/wq_b": MUON, "unit/blocks/1/attn/indexer/weights_proj": MUON,
        "unit/blocks/0/mlp/experts/gate": MUON, "unit/blocks/0/mlp/experts/up": MUON,
        "unit/blocks/0/mlp/experts/down": MUON, "prefix/0/mlp/experts/down": MUON,
        "unit/blocks/0/mlp/shared/gate": MUON, "unit/blocks/0/mlp/shared/up": MUON,
        "unit/blocks/0/mlp/shared/down": MUON, "unit/blocks/0/mlp/router/weight": MUON, "mtp/proj": MUON,
    }
    for path, label in expect.items():
        assert labels[path] == label, path
    for path, label in labels.items():
        if "norm/weight" in path or path.endswith(("/base", "/scale", "/sinks", "/position_bias")):
            assert label == ADAMW, path
    # non-trainable variables never reach the optimizer
    assert not any(path.endswith(("router/bias", "tid2eid")) for path in labels)
    assert set(labels.values()) == {MUON, ADAMW}


def test_partition_tiny_v3():
    _, labels = _labels("tiny-v3")
    for path in ["embed/embedding", "head/kernel", "norm/weight", "prefix/0/attn_norm/weight",
                 "unit/blocks/0/attn/q_norm/weight", "unit/blocks/0/attn/kv_norm/weight", "mtp/norm/weight"]:
        assert labels[path] == ADAMW, path
    for path in ["prefix/0/attn/wq_a", "prefix/0/attn/wq_b", "prefix/0/attn/wkv_a", "prefix/0/attn/wkv_b",
                 "prefix/0/attn/wo", "prefix/0/mlp/gate", "prefix/0/mlp/up", "prefix/0/mlp/down",
                 "unit/blocks/0/attn/wkv_a", "unit/blocks/0/attn/wkv_b", "unit/blocks/0/attn/wo",
                 "unit/blocks/0/mlp/experts/gate", "unit/blocks/0/mlp/shared/down", "mtp/block/attn/wo", "mtp/proj"]:
        assert labels[path] == MUON, path


def test_non_params_are_excluded():
    state = model.abstract(config.preset("tiny-v4"))
    flat = _flat(state)
    assert opt_lib.label_of("unit/blocks/0/mlp/router/bias", flat["unit/blocks/0/mlp/router/bias"]) is None
    assert opt_lib.label_of("prefix/0/mlp/router/tid2eid", flat["prefix/0/mlp/router/tid2eid"]) is None
    with pytest.raises(ValueError, match="nnx.Param"):
        opt_lib.partition(state)
    with pytest.raises(ValueError, match="nnx.Param"):
        opt_lib.make_optimizer(TrainConfig(), state)


def test_matrix_views():
    flat = _flat(model.abstract(config.preset("tiny-v4")).filter(nnx.Param))
    view = lambda path: opt_lib.matrix_view(path, flat[path])
    # per layer and per expert; [layers, experts, embed | expert_mlp]
    assert view("unit/blocks/0/mlp/experts/gate") == ((2, 8), 1, 64, 32)
    assert view("unit/blocks/0/attn/wq_b") == ((2,), 1, 32, 4 * 32)  # [q_lora | heads, head_dim]
    assert view("unit/blocks/0/attn/wo_a") == ((2,), 2, 2 * 32, 16)  # one matrix per output group
    assert view("unit/blocks/0/attn/wo_b") == ((2,), 1, 2 * 16, 64)  # [groups, o_lora | embed]
    assert view("mtp/proj") == ((), 2, 64, 64)  # e_proj and h_proj
    assert view("unit/blocks/0/mlp/router/weight") == ((2,), 1, 64, 8)  # experts is an output axis here
    flat3 = _flat(model.abstract(config.preset("tiny-v3")).filter(nnx.Param))
    assert opt_lib.matrix_view("unit/blocks/0/attn/wo", flat3["unit/blocks/0/attn/wo"]) == ((3,), 1, 4 * 16, 64)
    assert opt_lib.matrix_view("prefix/0/attn/wkv_b", flat3["prefix/0/attn/wkv_b"]) == ((), 1, 32, 4 * 32)
    # a new >2-D matrix without a layout row is an error, not a guess
    odd = _state(mystery=(np.zeros((4, 5, 6), np.float32), ("embed", "heads", "head_dim")))
    with pytest.raises(ValueError, match="MATRIX_LAYOUTS"):
        opt_lib.partition(odd)


def test_decay_mask():
    params = model.abstract(config.preset("tiny-v4")).filter(nnx.Param)
    mask = {path: var.get_value() for path, var in _flat(opt_lib.decay_mask(params)).items()}
    assert mask["embed/embedding"] and mask["head/kernel"] and mask["unit/blocks/0/attn/wq_a"]
    assert mask["unit/blocks/0/mlp/experts/down"]
    for path in ["norm/weight", "unit/blocks/0/attn/sinks", "hc_head/base", "hc_head/scale",
                 "prefix/2/attn/compressor/position_bias", "unit/blocks/0/attn_norm/weight"]:
        assert not mask[path], path


def test_optimizer_on_the_model_tree():
    """init / update over a whole model's parameters (traced only): same tree, same shapes, and the lr."""
    params = model.abstract(config.preset("tiny-v4")).filter(nnx.Param)
    train_cfg = TrainConfig()
    tx = opt_lib.make_optimizer(train_cfg, params)
    state = jax.eval_shape(tx.init, params)
    updates, state = jax.eval_shape(tx.update, params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(u.shape == p.shape for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)))
    assert opt_lib.learning_rate(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state), train_cfg) == 0.0


def test_flash_partition():
    """Every V4-Flash matrix has a layout (partition checks each Muon parameter's reshape)."""
    _, labels = _labels("deepseek-v4-flash")
    assert labels["unit/blocks/0/attn/wo_a"] == MUON and labels["hc_head/base"] == ADAMW


# ---------------------------------------------------------------------------------------------------------------
# schedule


def test_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_learning_rate_ratio=0.1, warmup_steps=10, steps=110)
    lr = opt_lib.schedule(cfg)
    np.testing.assert_allclose(lr(0), 0.0)
    np.testing.assert_allclose(lr(5), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(lr(60), 0.55e-3, rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(lr(110), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(lr(500), 1e-4, rtol=1e-5)
    assert all(float(lr(t + 1)) <= float(lr(t)) + 1e-12 for t in range(10, 120))
    no_warmup = opt_lib.schedule(TrainConfig(learning_rate=1e-3, warmup_steps=0, steps=10))
    np.testing.assert_allclose(no_warmup(0), 1e-3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# updates


def _singular_values(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_muon_update_is_orthogonal_adamw_is_not():
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    params = _state(w=(jax.random.normal(key1, (64, 32)), ("embed", "mlp")),
                    stacked=(jax.random.normal(key2, (3, 48, 16)), ("layers", "embed", "mlp")))
    grads = jax.tree.map(lambda p: jax.random.normal(key3, p.shape) * jnp.linspace(0.1, 3.0, p.shape[-1]), params)
    lr = 1e-2
    for kind, orthogonal in [("muon", True), ("adamw", False)]:
        tx = opt_lib.make_optimizer(_cfg(optimizer=kind, learning_rate=lr), params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        w = _flat(updates)["w"].get_value()
        sv = _singular_values(w)
        spread = sv.max() / sv.min()
        if orthogonal:
            assert spread < 1.05, sv
            # RMS matched to 0.18: O = O' sqrt(max(n, m)) 0.18, times the learning rate
            np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(w ** 2))), lr * 0.18, rtol=0.05)
            for layer in _flat(updates)["stacked"].get_value():  # each layer's matrix on its own
                sv = _singular_values(layer)
                assert sv.max() / sv.min() < 1.05, sv
        else:
            assert spread > 2.0, sv


def test_weight_decay_only_on_matrices():
    params = _state(w=(jnp.ones((8, 4)), ("embed", "mlp")), norm=(jnp.ones((8,)), ("embed",)))
    zeros = jax.tree.map(jnp.zeros_like, params)
    for kind in ("adamw", "muon"):
        cfg = _cfg(optimizer=kind, learning_rate=0.1, weight_decay=0.5)
        tx = opt_lib.make_optimizer(cfg, params)
        updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
        new = _flat(optax.apply_updates(params, updates))
        np.testing.assert_allclose(new["w"].get_value(), 0.95, rtol=1e-6)  # 1 - lr * wd
        np.testing.assert_allclose(new["norm"].get_value(), 1.0)


@pytest.mark.parametrize("kind,lr", [("muon", 0.5), ("adamw", 0.05)])
def test_quadratic_descends(kind, lr):
    key1, key2 = jax.random.split(jax.random.key(1))
    target = _state(w=(jax.random.normal(key1, (16, 8)), ("embed", "mlp")),
                    b=(jax.random.normal(key2, (8,)), ("mlp",)))
    params = jax.tree.map(jnp.zeros_like, target)
    loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))
    tx = opt_lib.make_optimizer(_cfg(optimizer=kind, learning_rate=lr, grad_clip_norm=1.0), params)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
    assert isinstance(params, nnx.State) and isinstance(_flat(params)["w"], nnx.Param)


def test_multisteps_equals_one_step_on_the_mean_gradient():
    """grad_accumulation=2 through optax.MultiSteps == one step on the averaged gradient (Muon's full chain)."""
    keys = jax.random.split(jax.random.key(2), 4)
    params = _state(w=(jax.random.normal(keys[0], (12, 6)), ("embed", "mlp")), b=(jnp.ones((6,)), ("mlp",)))
    g1 = jax.tree.map(lambda p: jax.random.normal(keys[1], p.shape), params)
    g2 = jax.tree.map(lambda p: jax.random.normal(keys[2], p.shape), params)
    cfg = _cfg(optimizer="muon", grad_accumulation=2, batch_size=8, weight_decay=0.1, grad_clip_norm=1.0)

    acc = opt_lib.make_optimizer(cfg, params)
    state = acc.init(params)
    update = jax.jit(acc.update)
    u1, state = update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u1))  # nothing applied mid-accumulation
    u2, state = update(g2, state, params)

    single = opt_lib.make_optimizer(cfg, params, accumulate=False)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expect, _ = jax.jit(single.update)(mean, single.init(params), params)
    for got, want in zip(jax.tree.leaves(u2), jax.tree.leaves(expect)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.tree.leaves(u2)[0]).max()) > 0
