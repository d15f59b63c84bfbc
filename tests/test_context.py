"""Context parallelism (`attention.context`): the sequence split over the mesh's `context` axis computes exactly
what one device computes, for every attention kind, the whole model and a train step; the bytes each kind moves
(counted in the compiled HLO) are the ones `cost.context_bytes` predicts.

Sequences hold two packed documents whose boundary falls inside a shard, so windows, compressed blocks (an entry
spanning the boundary is invalid) and the CSA overlap all straddle shard boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from v4jax import attention, cost, hlo, model
from v4jax.attention import context
from v4jax.config import AttentionKind, preset
from v4jax.layers.linear import fill_random
from v4jax.sharding import make_mesh, use_rules
from v4jax.training import data, step
from v4jax.training.config import RunConfig, TrainConfig

T = 128  # tokens per sequence: 64 / 32 / 16 per shard at context 2 / 4 / 8
BOUNDARIES = (50, 83)  # where each row's second document starts (not a multiple of any block or ratio)
LAYER_CONFIG = {AttentionKind.FULL: "tiny-hybrid", AttentionKind.SLIDING: "tiny-hybrid",
                AttentionKind.WINDOW: "tiny-v4", AttentionKind.CSA: "tiny-v4", AttentionKind.HCA: "tiny-v4"}


def packed(seq: int = T):
    """Segment ids and per-document positions [2, seq] for two documents per row."""
    index = np.arange(seq)
    segments = np.stack([(index >= b).astype(np.int32) for b in BOUNDARIES])
    positions = np.stack([np.where(index >= b, index - b, index) for b in BOUNDARIES]).astype(np.int32)
    return jnp.asarray(positions), jnp.asarray(segments)


def on_context(c: int, fn, *args, **mesh_axes):
    """fn(*args) jitted on a mesh whose `context` axis is c, the sequence (axis 1 of every array with one of
    length T) split over it."""
    mesh = make_mesh(context=c, **mesh_axes)

    def place(a):
        split = isinstance(a, jax.Array) and a.ndim >= 2 and a.shape[1] == T
        return jax.device_put(a, NamedSharding(mesh, P(None, "context") if split else P()))

    with use_rules("long"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn)(*jax.tree.map(place, args))


# ---------------------------------------------------------------------------------------------------------------
# one attention layer of each kind


@pytest.fixture(scope="module", params=list(LAYER_CONFIG), ids=lambda k: k.value)
def layer(request):
    kind = request.param
    cfg = preset(LAYER_CONFIG[kind])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: attention.make(cfg, kind, nnx.Rngs(0))))
    state = jax.jit(lambda k: fill_random(state, k))(jax.random.key(1))
    positions, segments = packed()
    x, r = (jax.random.normal(jax.random.key(i), (2, T, cfg.hidden_size)) for i in (2, 3))
    return cfg, kind, graphdef, state, (x, positions, segments, r)


def layer_value_and_grads(graphdef):
    def loss(state, x, positions, segments, r):
        y = context.attend(nnx.merge(graphdef, state), x, positions, segments)
        return jnp.sum(y * r), y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def assert_close(got, want, rtol, what):
    """Every leaf within rtol of the reference leaf's largest magnitude."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(np.abs(w).max(), 1e-30)
        assert np.abs(g - w).max() <= rtol * scale, f"{what}{jax.tree_util.keystr(path)}: " \
                                                     f"{np.abs(g - w).max() / scale:.2e} > {rtol}"


@pytest.mark.parametrize("c", [2, 4, 8])
def test_layer_split_equals_one_device(layer, c):
    cfg, kind, graphdef, state, inputs = layer
    f = layer_value_and_grads(graphdef)
    (_, want), want_grads = jax.jit(f)(state, *inputs)
    (_, got), got_grads = on_context(c, f, state, *inputs)
    assert_close(got, want, 1e-5, f"{kind.value} output")
    assert_close(got_grads, want_grads, 1e-4, f"{kind.value} grad")
    assert np.abs(np.asarray(want_grads[1])).max() > 0


@pytest.mark.parametrize("c", [2, 4])
def test_layer_bytes_match_cost_model(layer, c):
    """The collective-permutes and all-gathers XLA compiled for one layer's forward deliver exactly
    `cost.context_bytes` to the busiest device; nothing else is communicated."""
    cfg, kind, graphdef, state, (x, positions, segments, _) = layer
    mesh = make_mesh(context=c)

    def forward(state, x, positions, segments):
        return context.attend(nnx.merge(graphdef, state), x, positions, segments)

    split = NamedSharding(mesh, P(None, "context"))
    with use_rules("long"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        text = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), split, split, split)).lower(
            state, x, positions, segments).compile().as_text()
    ops = {op.op for op in hlo.collectives(text)}
    assert ops <= {"collective-permute", "all-gather"}, ops
    want = cost.context_bytes(cfg, kind, T, c, batch=2, value_bytes=4)
    assert hlo.received_bytes(text) == want


def test_context_bytes_worked_examples():
    cfg_v3, cfg_v4 = preset("deepseek-v3-671b"), preset("deepseek-v4-flash")
    seq = 1 << 20
    halo = cost.context_bytes(cfg_v4, AttentionKind.WINDOW, seq, 8)
    assert halo == cost.context_bytes(cfg_v4, AttentionKind.WINDOW, seq, 64) == 127 * (512 * 2 + 4)
    assert cost.context_bytes(cfg_v4, AttentionKind.WINDOW, seq, 1) == 0
    # M: 7/8 of the sequence's latents (512 + 64 bf16 + an int32 segment) plus the zig-zag swap of half a
    # shard's x (7168 bf16, position and segment) and of its output
    m8 = cost.context_bytes(cfg_v3, AttentionKind.FULL, seq, 8)
    assert m8 == 7 * (seq // 8) * (576 * 2 + 4) + (seq // 16) * (2 * 7168 * 2 + 8)
    # HCA gathers only one entry per 128 tokens
    assert cost.context_bytes(cfg_v4, AttentionKind.HCA, seq, 8) < cost.context_bytes(cfg_v3, AttentionKind.FULL,
                                                                                     seq, 8) / 100
    table = cost.report(cfg_v4, context=seq, context_shards=8).table()
    assert "context bytes/layer/device" in table and "split over 8 context shards" in table


@pytest.mark.parametrize("kind,seq,c,message", [
    (AttentionKind.HCA, 96, 4, "multiple of 16"),  # 24 tokens per shard: an HCA block would straddle two shards
    (AttentionKind.SLIDING, 64, 8, "window of 16"),  # 8 tokens per shard: the halo would need two neighbours
    (AttentionKind.WINDOW, 100, 8, "cannot be split evenly"),
])
def test_unsplittable_shapes_fail_clearly(kind, seq, c, message):
    cfg = preset(LAYER_CONFIG[kind])
    layer = attention.make(cfg, kind, nnx.Rngs(0))
    positions, segments = jnp.zeros((1, seq), jnp.int32), jnp.zeros((1, seq), jnp.int32)
    mesh = make_mesh(context=c)
    with use_rules("long"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), pytest.raises(ValueError,
                                                                                               match=message):
        jax.eval_shape(lambda x: context.attend(layer, x, positions, segments),
                       jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), jnp.float32))


# ---------------------------------------------------------------------------------------------------------------
# the whole model and a train step


@pytest.mark.parametrize("name,c,mesh_axes", [("tiny-v3", 2, {}), ("tiny-hybrid", 8, {}), ("tiny-v4", 4, {}),
                                              ("tiny-v4", 2, {"expert": 4})],
                         ids=["tiny-v3-c2", "tiny-hybrid-c8", "tiny-v4-c4", "tiny-v4-c2xexpert4"])
def test_model_logits_and_grads_split_equal_one_device(name, c, mesh_axes):
    cfg = preset(name)
    params = model.init(cfg, jax.random.key(0))
    positions, segments = packed()
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)

    def loss(params, tokens):
        logits = model.apply(cfg, params, tokens, positions=positions, segment_ids=segments).logits
        return jnp.mean(logits ** 2), logits

    f = jax.value_and_grad(loss, has_aux=True, allow_int=True)
    (_, want), want_grads = jax.jit(f)(params, tokens)
    (_, got), got_grads = on_context(c, f, params, tokens, **mesh_axes)
    assert_close(got, want, 1e-5, "logits")
    floats = lambda g: [a for a in jax.tree.leaves(g) if a.dtype != jax.dtypes.float0]  # noqa: E731
    # mHC's few parameters sum gradients over every token: float32 summation order alone moves them ~1e-4
    # (the same on a data-parallel mesh without any split)
    assert_close(floats(got_grads), floats(want_grads), 1e-3, "grad")


def test_train_step_with_context_4_equals_unsplit_step():
    """tiny-v4 cut to W, C, H (every kind, MTP, mHC, hash routing): one step on data=2 x context=4 (the mesh
    implies the `long` rules) equals the step on one device."""
    cfg = preset("tiny-v4", pattern="WCH", first_hash_layers=1, capacity_factor=None)
    run_cfg = RunConfig(model=cfg, train=TrainConfig(batch_size=4, seq_len=64, router_bias_update_rate=1e-2))
    opt = optax.sgd(0.1)
    batch = jax.tree.map(jnp.asarray, data.synthetic("counting", cfg.vocab_size, 64, seed=0, batch_size=4,
                                                     symbols=16).batch(0))
    single = step.init_state(run_cfg, opt, jax.random.key(0))
    single, single_metrics = step.jit_train_step(run_cfg, opt, single)(single, batch)

    mesh = make_mesh(data=2, context=4)
    assert step.batch_sharding(mesh).spec == P("data", "context")
    sharded = step.init_state(run_cfg, opt, jax.random.key(0), mesh=mesh)
    lowered = step.jit_train_step(run_cfg, opt, sharded, mesh).lower(sharded, batch)
    assert "collective_permute" in lowered.as_text()  # the halo exchange really ran
    sharded, metrics = lowered.compile()(sharded, batch)

    single, sharded, single_metrics, metrics = jax.device_get((single, sharded, single_metrics, metrics))
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[name], single_metrics[name], rtol=1e-5, err_msg=name)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(sharded.params),
                                 jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
