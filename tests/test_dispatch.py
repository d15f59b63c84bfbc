"""Expert parallelism on the 8-device mesh: every dispatch (ep_a2a, ep_ragged, ep_psum, auto) against the dense
per-token reference in values and gradients, capacity drops counted independently per shard, the a2a byte
metric against an independent count, `auto`'s choices, and a whole tiny-v4 train step under EP.

Everything runs inside jit: eager calls on this CPU compile one kernel per op and shape.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from test_moe import independent_drops
from v4jax import cost, hlo
from v4jax.config import MlpKind, MoeImpl, capacity, preset
from v4jax.moe import dispatch
from v4jax.moe.moe import MoE
from v4jax.sharding import PRESETS, Preset, make_mesh, use_rules
from v4jax.training import data, step
from v4jax.training.config import RunConfig, TrainConfig

B, T = 4, 8
TRAIN = PRESETS[Preset.TRAIN]

LAYOUTS = {  # mesh sizes, expert_tensor_parallel
    "data2-expert4": (dict(data=2, expert=4), False),
    "expert8": (dict(expert=8), False),  # batch 4 cannot take 8 shards: the sequence takes `expert`
    "data2-expert2-tensor2-tp": (dict(data=2, expert=2, tensor=2), True),  # expert width split over `tensor`
    "fsdp2-expert2-tensor2": (dict(fsdp=2, expert=2, tensor=2), False),  # weights gathered over fsdp
}
EP_IMPLS = ("ep_a2a", "ep_ragged", "ep_psum", "auto")


def build(cfg, kind=MlpKind.MOE, seed=0):
    """A MoE whose routing is far from uniform and whose routed part is large next to the tolerances."""
    moe = MoE(cfg, nnx.Rngs(params=seed), kind)
    rng = np.random.default_rng(seed + 1)
    e = cfg.n_routed_experts
    moe.router.weight.set_value(jnp.asarray(0.2 * rng.standard_normal((cfg.hidden_size, e)), jnp.float32))
    if not moe.is_hash:
        moe.router.bias.set_value(jnp.asarray(0.05 * rng.standard_normal(e), jnp.float32))
    for name in ("gate", "up", "down"):
        variable = getattr(moe.experts, name)
        variable.set_value(jnp.asarray(0.2 * rng.standard_normal(variable.shape), jnp.float32))
    return nnx.split(moe, nnx.Param, ...)


def inputs(cfg, seed=2):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    return x, cotangent, tokens


def run(graphdef, params, rest, x, cotangent, tokens, mesh=None, rules=TRAIN):
    """(y, stats, routing, d_params, d_x) of sum(y * cotangent), jitted under `mesh` and `rules`."""
    def loss(params, x):
        moe = nnx.merge(graphdef, params, rest)
        y, stats = moe(x, tokens)
        b, t, d = x.shape
        _, indices = moe.route(x.reshape(b * t, d), tokens)
        return jnp.sum(y * cotangent), (y, stats, indices.reshape(b, t, -1))

    def fn(params, x):
        with use_rules(rules):
            (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            return aux, nnx.to_pure_dict(grads[0]), grads[1]

    if mesh is None:
        return jax.device_get(jax.jit(fn)(params, x))
    with jax.set_mesh(mesh):
        return jax.device_get(jax.jit(fn)(params, x))


def assert_same(got, want, tol=2e-5):
    (y, stats, _), d_params, d_x = got
    (ref_y, ref_stats, _), ref_d_params, ref_d_x = want
    assert np.abs(ref_y).max() > 0.1
    np.testing.assert_allclose(y, ref_y, atol=tol, rtol=tol)
    np.testing.assert_allclose(d_x, ref_d_x, atol=tol, rtol=tol)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(ref_d_params))
    for path, g in jax.tree_util.tree_leaves_with_path(d_params):
        np.testing.assert_allclose(g, flat_want[path], atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))
    assert np.abs(ref_d_params["experts"]["down"]).max() > 0.1
    np.testing.assert_array_equal(stats["expert_load"], ref_stats["expert_load"])
    assert float(stats["dropped_fraction"]) == 0.0


@pytest.fixture(scope="module")
def v3_moe():
    cfg = preset("tiny-v3", capacity_factor=None)  # 8 experts, top-2, 1 shared
    _, params, rest = build(cfg)
    x, cotangent, tokens = inputs(cfg)
    reference = run(nnx.split(MoE(cfg.replace(moe_impl="dense"), nnx.Rngs(params=0)))[0], params, rest, x,
                    cotangent, tokens)
    return cfg, params, rest, (x, cotangent, tokens), reference


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", EP_IMPLS)
def test_expert_parallel_equals_dense(v3_moe, layout, impl):
    cfg, params, rest, (x, cotangent, tokens), reference = v3_moe
    sizes, expert_tp = LAYOUTS[layout]
    graphdef = nnx.split(MoE(cfg.replace(moe_impl=impl, expert_tensor_parallel=expert_tp), nnx.Rngs(params=0)))[0]
    got = run(graphdef, params, rest, x, cotangent, tokens, make_mesh(**sizes))
    assert_same(got, reference)


@pytest.mark.parametrize("sizes,rules", [({"data": 4}, TRAIN), ({"data": 2, "context": 4}, "long")],
                         ids=["data4", "data2-context4"])
def test_local_impl_runs_per_token_shard_without_an_expert_axis(v3_moe, sizes, rules):
    """Without expert parallelism each token shard runs the einsum on its own tokens: equal to the dense reference,
    and no device gathers the token rows (GSPMD would, for the sort and the [e, tokens, d] buffers)."""
    cfg, params, rest, (x, cotangent, tokens), reference = v3_moe
    graphdef = nnx.split(MoE(cfg.replace(moe_impl="einsum"), nnx.Rngs(params=0)))[0]
    mesh = make_mesh(**sizes)
    assert_same(run(graphdef, params, rest, x, cotangent, tokens, mesh, rules), reference)
    with jax.set_mesh(mesh), use_rules(rules):
        text = jax.jit(lambda x: nnx.merge(graphdef, params, rest)(x, tokens)[0]).lower(x).compile().as_text()
    assert "moe_einsum_per_shard" in text
    # (the router's small per-token scores are still gathered by GSPMD for its top-k; token rows never are)
    gathered = [op.shape for op in hlo.collectives(text) if op.op == "all-gather"]
    assert all(shape[-1] != cfg.hidden_size for shape in gathered), gathered


def test_hash_routed_layer_under_expert_parallelism():
    """V4's hash layer (frozen token-id table, sqrt-softplus weights, SwiGLU clamp) routes the same under EP."""
    cfg = preset("tiny-v4", capacity_factor=None)
    _, params, rest = build(cfg, MlpKind.HASH)
    x, cotangent, tokens = inputs(cfg)
    reference = run(nnx.split(MoE(cfg.replace(moe_impl="dense"), nnx.Rngs(params=0), MlpKind.HASH))[0],
                    params, rest, x, cotangent, tokens)
    for impl in ("ep_a2a", "ep_ragged"):
        ep_graphdef = nnx.split(MoE(cfg.replace(moe_impl=impl), nnx.Rngs(params=0), MlpKind.HASH))[0]
        assert_same(run(ep_graphdef, params, rest, x, cotangent, tokens, make_mesh(data=2, expert=4)), reference)


# ---------------------------------------------------------------------------------------------------------------
# capacity: what is dropped, counted independently per shard


def a2a_drops(indices: np.ndarray, shards: int, slots: int) -> np.ndarray:
    """ep_a2a on data2-expert4 splits the batch rows over 8 shards; each caps (its tokens, expert) at `slots`."""
    rows = indices.shape[0] // shards
    return np.concatenate([independent_drops(indices[s * rows:(s + 1) * rows], slots) for s in range(shards)])


def ragged_drops(indices: np.ndarray, groups: int, p: int, e: int, recv_rows: int) -> np.ndarray:
    """ep_ragged: within each group of p source shards, every destination shard's receive buffer takes the sources'
    rows in source order, each source's rows sorted by expert (stably), up to `recv_rows` rows."""
    shards = groups * p
    rows = indices.shape[0] // shards
    dropped = np.zeros(indices.shape, bool)
    for g in range(groups):
        filled = collections.Counter()
        for s in range(g * p, (g + 1) * p):
            local = indices[s * rows:(s + 1) * rows].reshape(-1)
            order = np.argsort(local, kind="stable")
            mask = np.zeros(local.size, bool)
            for a in order:
                dest = local[a] // (e // p)
                mask[a] = filled[dest] >= recv_rows
                filled[dest] += 1
            dropped[s * rows:(s + 1) * rows] = mask.reshape(rows, *indices.shape[1:])
    return dropped


@pytest.mark.parametrize("impl", ["ep_a2a", "ep_ragged", "ep_psum"])
def test_small_capacity_drops_are_reported_and_fall_back_to_the_shared_path(impl):
    cfg = preset("tiny-v3", capacity_factor=0.5 if impl != "ep_ragged" else 0.75, moe_impl=impl)
    graphdef, params, rest = build(cfg)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((8, T, cfg.hidden_size)), jnp.float32)  # 8 rows: one per shard
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    tokens = jnp.zeros((8, T), jnp.int32)
    mesh = make_mesh(data=2, expert=4)
    (y, stats, indices), d_params, d_x = run(graphdef, params, rest, x, cotangent, tokens, mesh)
    k = cfg.num_experts_per_tok
    if impl == "ep_a2a":  # fixed slots per (source shard, expert)
        expected = a2a_drops(indices, 8, capacity(cfg, T))
    elif impl == "ep_psum":  # tokens whole over `expert`: the one-device capacity over each data shard's tokens
        expected = a2a_drops(indices, 2, capacity(cfg, 4 * T))
    else:  # a receive buffer of ceil(0.75 * T * k) rows per destination shard
        expected = ragged_drops(indices, groups=2, p=4, e=8, recv_rows=math.ceil(0.75 * T * k))
    assert 0.05 < expected.mean() < 0.9  # the case is not trivial
    np.testing.assert_allclose(float(stats["dropped_fraction"]), expected.mean(), rtol=1e-6)

    # Dropped assignments add nothing: the output is the dense reference with their weights zeroed, plus the
    # shared expert (which, like the residual, still carries every token), in values and gradients.
    def reference(params, x):
        moe = nnx.merge(graphdef, params, rest)
        b, t, d = x.shape
        weights, idx = moe.route(x.reshape(b * t, d))
        weights = jnp.where(jnp.asarray(expected).reshape(b * t, k), 0.0, weights).reshape(b, t, k)
        out = dispatch.routed(cfg.replace(moe_impl="dense"), moe.experts.ffn(x.dtype), x, weights,
                              idx.reshape(b, t, k))
        return jnp.sum((out.y + moe.shared(x)) * cotangent), out.y + moe.shared(x)

    (_, ref_y), (ref_d_params, ref_d_x) = jax.device_get(
        jax.jit(jax.value_and_grad(reference, argnums=(0, 1), has_aux=True))(params, x))
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(d_x, ref_d_x, atol=2e-5, rtol=2e-5)
    ref_d_params = nnx.to_pure_dict(ref_d_params)
    for name in ("gate", "up", "down"):
        np.testing.assert_allclose(d_params["experts"][name], ref_d_params["experts"][name], atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# the all-to-all byte metric


def test_a2a_bytes_metric_counts_what_crosses_devices(v3_moe):
    cfg, params, rest, (x, cotangent, tokens), _ = v3_moe
    mesh = make_mesh(data=2, expert=4)
    d, e, p = cfg.hidden_size, cfg.n_routed_experts, 4
    got = {}
    for impl in ("ep_a2a", "ep_ragged", "ep_psum"):
        graphdef = nnx.split(MoE(cfg.replace(moe_impl=impl), nnx.Rngs(params=0)))[0]
        (_, stats, indices), _, _ = run(graphdef, params, rest, x, cotangent, tokens, mesh)
        got[impl] = float(stats["a2a_bytes"])
    # ep_a2a: every shard sends its whole [p, l, c, d] buffer but its own part, there and back: the cost model's
    # figure, per device, times the 8 devices.
    n_local = B * T // 8
    assert got["ep_a2a"] == 8 * 2 * (p - 1) / p * e * capacity(cfg, n_local) * d * 4
    assert got["ep_a2a"] == 8 * cost.moe_exchange_bytes(cfg, n_local, p, "ep_a2a", value_bytes=4)
    # ep_ragged: only assignments whose expert lives on another shard of the expert group travel, there and back.
    # Batch 4 splits over data only, so the time axis takes `expert`: token (b, t) sits on expert shard t // 2.
    source_shard = np.broadcast_to(np.arange(T) // (T // p), (B, T))
    remote = (indices // (e // p) != source_shard[..., None]).sum()
    assert got["ep_ragged"] == 2 * remote * d * 4
    # The cost model's balanced-router estimate is of the same order as the real (skewed) count.
    estimate = 8 * cost.moe_exchange_bytes(cfg, n_local, p, "ep_ragged", value_bytes=4)
    assert 0.5 < got["ep_ragged"] / estimate < 1.5
    assert got["ep_psum"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# auto


def test_auto_picks_by_backend_mesh_and_token_count():
    cfg = preset("tiny-v3")  # 8 experts, top-2

    def pick(b, t, mesh=None, rules=TRAIN):
        def trace():
            with use_rules(rules):
                return dispatch.resolve_impl(cfg, b, t)
        if mesh is None:
            return trace()
        with jax.set_mesh(mesh):
            return trace()

    assert pick(4, 64) is MoeImpl.EINSUM  # one device, CPU: the capacity einsum
    assert pick(4, 64, make_mesh(data=8)) is MoeImpl.EINSUM  # experts not split
    assert pick(4, 64, make_mesh(data=2, expert=4)) is MoeImpl.EP_A2A  # XLA:CPU has no ragged_all_to_all
    assert pick(8, 1, make_mesh(data=2, expert=4)) is MoeImpl.EP_PSUM  # 1 token x top-2 per shard < 8 experts
    assert pick(1, 1, make_mesh(expert=8)) is MoeImpl.EP_PSUM  # cannot split one token over 8 shards
    serve = PRESETS[Preset.SERVE]  # batch on `data` only: a prefill chunk is split over `expert` for the exchange
    assert pick(8, 64, make_mesh(data=2, expert=4), serve) is MoeImpl.EP_A2A
    assert pick(8, 1, make_mesh(data=2, expert=4), serve) is MoeImpl.EP_PSUM  # a decode step
    assert not dispatch.ragged_all_to_all_supported("cpu")
    with pytest.raises(ValueError, match="mesh"):
        dispatch.routed(cfg.replace(moe_impl="ep_a2a"), None, jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 2)),
                        jnp.zeros((1, 2, 2), jnp.int32))


def test_explicit_a2a_on_too_few_tokens_runs_as_psum(v3_moe):
    """A decode step with ep_a2a configured: one row cannot be split over 8 shards, so it runs replicated (exact)."""
    cfg, params, rest, (x, cotangent, tokens), _ = v3_moe
    graphdef = nnx.split(MoE(cfg.replace(moe_impl="ep_a2a"), nnx.Rngs(params=0)))[0]
    dense = nnx.split(MoE(cfg.replace(moe_impl="dense"), nnx.Rngs(params=0)))[0]
    one = (x[:1, :1], cotangent[:1, :1], tokens[:1, :1])
    got = run(graphdef, params, rest, *one, make_mesh(expert=8))
    want = run(dense, params, rest, *one)
    np.testing.assert_allclose(got[0][0], want[0][0], atol=2e-5, rtol=2e-5)
    assert float(got[0][1]["a2a_bytes"]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# a whole train step


def test_tiny_v4_train_step_under_expert_parallelism_equals_single_device():
    """A hash layer, learned-router layers, the router-bias update, MTP and mHC: one step on data=2 x expert=4 with
    moe_impl auto (ep_a2a here) equals the same step on one device (the einsum back end). tiny-v4 cut to three
    layers (W, C, H) keeps the compile short; SGD keeps parameter differences proportional to gradient ones."""
    cfg = preset("tiny-v4", pattern="WCH", first_hash_layers=1, capacity_factor=None)
    run_cfg = RunConfig(model=cfg, train=TrainConfig(batch_size=8, seq_len=32, router_bias_update_rate=1e-2))
    opt = optax.sgd(0.1)
    batch = jax.tree.map(jnp.asarray, data.synthetic("counting", cfg.vocab_size, 32, seed=0, batch_size=8,
                                                     symbols=16).batch(0))

    single = step.init_state(run_cfg, opt, jax.random.key(0))
    single, single_metrics = step.jit_train_step(run_cfg, opt, single)(single, batch)

    mesh = make_mesh(data=2, expert=4)
    sharded = step.init_state(run_cfg, opt, jax.random.key(0), mesh=mesh)
    lowered = step.jit_train_step(run_cfg, opt, sharded, mesh).lower(sharded, batch)
    assert "all-to-all" in lowered.as_text() or "all_to_all" in lowered.as_text()  # the EP dispatch really ran
    sharded, metrics = lowered.compile()(sharded, batch)

    single, sharded, single_metrics, metrics = jax.device_get((single, sharded, single_metrics, metrics))
    for name in ("loss", "grad_norm", "dropped_fraction"):
        np.testing.assert_allclose(metrics[name], single_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(metrics["expert_load"], single_metrics["expert_load"])
    assert float(metrics["a2a_bytes"]) > 0 and float(single_metrics["a2a_bytes"]) == 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(sharded.params),
                                 jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    biases = [(jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_leaves_with_path(sharded.extras)]
    for (name, got), want in zip(biases, jax.tree.leaves(single.extras), strict=True):
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert any(np.abs(b).max() > 0 for name, b in biases if "bias" in name)  # the router biases moved


def test_native_ragged_exchange_traces_with_gradients(v3_moe, monkeypatch):
    """XLA:CPU cannot compile `ragged_all_to_all`, but it can lower it: with the feature detection forced on, the
    ep_ragged forward and backward lower to the native collective (shapes, dtypes and the transpose all check)."""
    cfg, params, rest, (x, cotangent, tokens), _ = v3_moe
    monkeypatch.setattr(dispatch, "ragged_all_to_all_supported", lambda platform: True)
    graphdef = nnx.split(MoE(cfg.replace(moe_impl="ep_ragged"), nnx.Rngs(params=0)))[0]

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * cotangent)

    with jax.set_mesh(make_mesh(data=2, expert=4)):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
    # Two exchanges forward (there and back) and their two transposes backward.
    assert hlo.count("ragged_all_to_all") + hlo.count("ragged-all-to-all") >= 4
