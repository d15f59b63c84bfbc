"""MoE: the DeepSeek router against an independent numpy implementation, the three expert back ends against each
other (values and gradients), capacity drops counted independently, and the load statistics.

Everything runs inside jit: eager calls on this CPU compile one kernel per op and shape.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import capacity, preset
from v4jax.moe import dispatch
from v4jax.moe.moe import MoE
from v4jax.moe.routing import Router, RouterBias

D = 64  # tiny-v3 hidden size


def numpy_route(x, weight, bias, cfg):
    """DeepSeek-V3 group-limited routing, written from the paper / HF reference, in float64."""
    logits = x.astype(np.float64) @ weight.astype(np.float64)
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores + bias  # the bias steers selection only
    n, e = choice.shape
    if cfg.n_group > 1:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # each group's best two experts
        top_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :cfg.topk_group]
        keep = np.zeros((n, cfg.n_group), bool)
        keep[np.arange(n)[:, None], top_groups] = True
        choice = np.where(keep[:, :, None], grouped, -np.inf).reshape(n, e)
    indices = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = np.take_along_axis(scores, indices, -1)  # from the unbiased scores
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * cfg.routed_scaling_factor, indices


def by_expert(weights, indices):
    """Per token, (indices, weights) sorted by expert id: top-k order is not part of the contract."""
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(indices, order, -1), np.take_along_axis(weights, order, -1)


@functools.partial(jax.jit, static_argnums=0)
def run_router(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


ROUTERS = {
    "groups": dict(),  # tiny-v3: sigmoid, 4 groups of 2, top-2 groups, top-2 experts, norm, scale 2.5
    "groups-top3": dict(num_experts_per_tok=3, n_group=2, topk_group=1, n_routed_experts=8),
    "no-groups-no-norm": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
    "softmax": dict(scoring_func="softmax", n_group=2, topk_group=1),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_numpy(name):
    cfg = preset("tiny-v3", **ROUTERS[name])
    rng = np.random.default_rng(0)
    n, e = 96, cfg.n_routed_experts
    x = rng.standard_normal((n, D)).astype(np.float32)
    weight = (0.3 * rng.standard_normal((D, e))).astype(np.float32)
    scale = 0.3 if cfg.scoring_func == "sigmoid" else 0.05
    bias = (scale * rng.standard_normal(e)).astype(np.float32)
    router = Router(cfg, nnx.Rngs(params=0))
    router.weight.set_value(jnp.asarray(weight))
    router.bias.set_value(jnp.asarray(bias))
    assert isinstance(router.bias, RouterBias) and not isinstance(router.bias, nnx.Param)
    graphdef, state = nnx.split(router)

    weights, indices = jax.device_get(run_router(graphdef, state, jnp.asarray(x)))
    assert weights.dtype == np.float32 and indices.dtype == np.int32
    assert weights.shape == indices.shape == (n, cfg.num_experts_per_tok)
    expected_weights, expected_indices = numpy_route(x, weight, bias, cfg)
    got_i, got_w = by_expert(weights, indices)
    want_i, want_w = by_expert(expected_weights, expected_indices)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob:
        np.testing.assert_allclose(weights.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)

    # The comparison is sharp: the bias changes which experts some tokens get, and group limits bind.
    unbiased = numpy_route(x, weight, np.zeros_like(bias), cfg)[1]
    assert (np.sort(unbiased, -1) != want_i).any(axis=-1).sum() >= 5
    if cfg.n_group > 1:
        ungrouped = numpy_route(x, weight, bias, cfg.replace(n_group=1, topk_group=1))[1]
        assert (np.sort(ungrouped, -1) != want_i).any()
        # Every token's experts lie in at most topk_group groups.
        groups = want_i // (e // cfg.n_group)
        assert max(len(set(row)) for row in groups) <= cfg.topk_group


# ---------------------------------------------------------------------------------------------------------------
# expert back ends


def build(cfg, seed=0):
    moe = MoE(cfg, nnx.Rngs(params=seed))
    e = cfg.n_routed_experts
    # A nonzero bias and a sharper router than the default init, so routing is far from uniform.
    rng = np.random.default_rng(seed + 1)
    moe.router.bias.set_value(jnp.asarray(0.05 * rng.standard_normal(e), jnp.float32))
    moe.router.weight.set_value(jnp.asarray(0.2 * rng.standard_normal((cfg.hidden_size, e)), jnp.float32))
    # Larger expert weights so the routed part is not negligible next to tolerances.
    for name in ("gate", "up", "down"):
        variable = getattr(moe.experts, name)
        variable.set_value(jnp.asarray(0.2 * rng.standard_normal(variable.shape), jnp.float32))
    return moe


def inputs(shape, seed=2):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.fixture(scope="module")
def backends():
    """Outputs, stats and gradients (wrt x and every Param) of one MoE's weights under each back end."""
    base = preset("tiny-v3", capacity_factor=None)
    graphdefs = {}
    params = rest = None
    for impl in ("dense", "einsum", "ragged"):
        graphdef, p, r = nnx.split(build(base.replace(moe_impl=impl)), nnx.Param, ...)
        graphdefs[impl] = graphdef
        params, rest = (p, r) if params is None else (params, rest)  # one set of weights for all three
    x, cotangent = inputs((2, 12, D))

    @jax.jit
    def run(params, rest, x):
        out = {}
        for impl, graphdef in graphdefs.items():
            def loss(params, x):
                y, stats = nnx.merge(graphdef, params, rest)(x)
                return jnp.sum(y * cotangent), (y, stats)

            (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            out[impl] = dict(y=y, stats=stats, d_params=nnx.to_pure_dict(grads[0]), d_x=grads[1])
        return out

    return jax.device_get(run(params, rest, x))


@pytest.mark.parametrize("impl", ["einsum", "ragged"])
def test_backend_equals_dense(backends, impl):
    dense, other = backends["dense"], backends[impl]
    assert other["y"].shape == (2, 12, D)
    np.testing.assert_allclose(other["y"], dense["y"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(other["d_x"], dense["d_x"], atol=1e-5, rtol=1e-5)
    for name in ("gate", "up", "down"):
        want = dense["d_params"]["experts"][name]
        got = other["d_params"]["experts"][name]
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(other["d_params"]["router"]["weight"], dense["d_params"]["router"]["weight"],
                               atol=1e-5, rtol=1e-5)
    assert float(other["stats"]["dropped_fraction"]) == 0.0  # exact capacity drops nothing
    np.testing.assert_array_equal(other["stats"]["expert_load"], dense["stats"]["expert_load"])


def test_routed_experts_matter(backends):
    """Guard for the comparison above: the routed part is a real share of the output and of the gradient."""
    dense = backends["dense"]
    assert np.abs(dense["y"]).max() > 0.1
    assert np.abs(dense["d_params"]["experts"]["down"]).max() > 0.1


def test_expert_load(backends):
    for impl, out in backends.items():
        load = out["stats"]["expert_load"]
        assert load.shape == (8,) and load.dtype == np.float32
        assert load.sum() == 2 * 12 * 2, impl  # tokens * k
        assert (load >= 0).all() and load.max() < load.sum()


# ---------------------------------------------------------------------------------------------------------------
# capacity drops


def loss_and_grads(fn, params, x, cotangent):
    """fn(params, x) -> (y, aux); returns y, aux and d(sum(y * cotangent)) / d(params, x)."""
    def loss(params, x):
        y, aux = fn(params, x)
        return jnp.sum(y * cotangent), (y, aux)

    (_, (y, aux)), (d_params, d_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, aux, nnx.to_pure_dict(d_params), d_x


@functools.partial(jax.jit, static_argnums=(0, 4))
def capacity_run(graphdef, params, rest, x, slots, cotangent):
    """The einsum MoE (output, stats, gradients) plus the router's choices and the per-assignment drop mask."""
    def fn(params, x):
        moe = nnx.merge(graphdef, params, rest)
        y, stats = moe(x)
        b, t, d = x.shape
        weights, indices = moe.router(x.reshape(b * t, d))
        cfg = moe.cfg
        assert capacity(cfg, b * t) == slots
        out = dispatch.routed(cfg, moe.experts.ffn(x.dtype), x, weights.reshape(b, t, -1), indices.reshape(b, t, -1))
        return y, (stats, weights, indices, out.dropped.reshape(indices.shape))

    return loss_and_grads(fn, params, x, cotangent)


@functools.partial(jax.jit, static_argnums=0)
def dense_with_dropped(graphdef, params, rest, x, dropped, cotangent):
    """The dense reference with the given assignments' routing weights zeroed, plus the shared expert."""
    def fn(params, x):
        moe = nnx.merge(graphdef, params, rest)
        b, t, d = x.shape
        weights, indices = moe.router(x.reshape(b * t, d))
        weights = jnp.where(dropped, 0.0, weights).reshape(b, t, -1)
        out = dispatch.routed(moe.cfg.replace(moe_impl="dense"), moe.experts.ffn(x.dtype), x, weights,
                              indices.reshape(b, t, -1))
        return out.y + moe.shared(x), None

    return loss_and_grads(fn, params, x, cotangent)


def independent_drops(indices: np.ndarray, slots: int) -> np.ndarray:
    """Assignment (token i, choice j) is dropped when its rank among its expert's assignments, in token order,
    is >= capacity."""
    seen = collections.Counter()
    dropped = np.zeros(indices.size, bool)
    for a, expert in enumerate(indices.reshape(-1)):
        dropped[a] = seen[expert] >= slots
        seen[expert] += 1
    return dropped.reshape(indices.shape)


def test_capacity_drops_are_counted_and_contribute_nothing():
    cfg = preset("tiny-v3", capacity_factor=0.5, moe_impl="einsum")
    b, t = 2, 16
    slots = capacity(cfg, b * t)
    assert slots == 4  # ceil(0.5 * 32 tokens * top-2 / 8 experts)
    graphdef, params, rest = nnx.split(build(cfg), nnx.Param, ...)
    x, cotangent = inputs((b, t, D), seed=3)
    y, (stats, weights, indices, dropped), d_params, d_x = jax.device_get(
        capacity_run(graphdef, params, rest, x, slots, cotangent))

    expected = independent_drops(indices, slots)
    assert 0.1 < expected.mean() < 0.9  # the case is not trivial
    np.testing.assert_array_equal(dropped.reshape(indices.shape), expected)
    np.testing.assert_allclose(float(stats["dropped_fraction"]), expected.mean(), rtol=1e-6)
    # Every expert keeps exactly min(load, slots) assignments.
    load = np.bincount(indices.reshape(-1), minlength=8)
    kept = np.bincount(indices[~expected], minlength=8)
    np.testing.assert_array_equal(kept, np.minimum(load, slots))
    np.testing.assert_array_equal(stats["expert_load"], load)

    # Dropped assignments contribute nothing, to the output or to any gradient.
    ref_y, _, ref_d_params, ref_d_x = jax.device_get(
        dense_with_dropped(graphdef, params, rest, x, jnp.asarray(expected), cotangent))
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(d_x, ref_d_x, atol=1e-5, rtol=1e-5)
    for path, want in jax.tree_util.tree_leaves_with_path(ref_d_params):
        got = d_params
        for key in path:
            got = got[key.key]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # ... and the drops really removed something: the undropped dense output differs.
    full_y = jax.device_get(dense_with_dropped(graphdef, params, rest, x, jnp.zeros_like(expected), cotangent))[0]
    assert not np.allclose(y, full_y, atol=1e-3)


def test_block_slots_pack_each_group_into_its_own_blocks():
    rng = np.random.default_rng(0)
    groups, block = 5, 4
    row_group = jnp.asarray(rng.choice(groups + 1, 37, p=[0.4, 0.05, 0.2, 0.0, 0.25, 0.1]), jnp.int32)
    slot, block_group = jax.jit(dispatch.block_slots, static_argnums=(1, 2))(row_group, groups, block)
    slot, block_group, row_group = map(np.asarray, (slot, block_group, row_group))
    n_blocks = len(block_group)
    assert n_blocks == -(-(37 + groups * (block - 1)) // block)
    here = row_group < groups
    assert (slot[~here] == n_blocks * block).all()  # rows of no group here get no slot
    assert len(set(slot[here])) == here.sum() and (slot[here] < n_blocks * block).all()
    np.testing.assert_array_equal(block_group[slot[here] // block], row_group[here])  # a block holds one group
    for g in range(groups):  # each group fills whole blocks from its first one, in row order
        s = slot[row_group == g]
        assert (np.diff(s) == 1).all() and (s.size == 0 or s[0] % block == 0)


@pytest.mark.parametrize("r", [30, 3], ids=["packed", "row_per_block"])  # 3 rows < 4 groups: decode's in-place way
def test_blocked_equals_capacity_buffers_with_rows_for_other_shards(r):
    rng = np.random.default_rng(1)
    g, d, f = 4, 8, 16
    w = dispatch.FFN(*(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((g, d, f), (g, d, f), (g, f, d))))
    rows = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
    # group g: another shard's rows; the few-row case has one, and its groups out of row order
    row_group = jnp.asarray(rng.integers(0, g + 1, r) if r > g else [2, g, 0], jnp.int32)

    def both(w, rows):
        blocked, kept_b = dispatch.blocked(w, rows, row_group, block=3)
        slot = dispatch.slots(row_group, g, r)
        buffers = dispatch.from_buffers(dispatch.ffn_buffers(w, dispatch.to_buffers(rows, slot, g, r)), slot)
        return blocked, kept_b, buffers, slot < g * r

    blocked, kept_b, buffers, kept = jax.jit(both)(w, rows)
    np.testing.assert_array_equal(kept_b, kept)
    np.testing.assert_allclose(blocked, buffers, rtol=1e-5, atol=1e-5)
    blocked, kept = np.asarray(blocked), np.asarray(kept)
    assert np.abs(blocked[kept]).min() > 0 and (blocked[~kept] == 0).all()
