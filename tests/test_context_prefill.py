"""Prefill with the sequence split over `context`: a prompt longer than a chunk, into empty rows, runs in one pass
through the layers' context-parallel bodies, each of which also builds its cache (`context.prefill`). The logits at
the prompt's end and at every later decode step equal the single-device forward, for every kind, with prompts
whose windows, compressed blocks and CSA overlaps straddle shard boundaries."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from test_decode import scaled_params

from v4jax import attention, config, cost, hlo, model
from v4jax.attention import cached, context
from v4jax.config import AttentionKind
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode
from v4jax.serving.engine import Engine
from v4jax.serving.sampling import SamplingParams
from v4jax.sharding import make_mesh, mesh_rules, state_shardings, use_rules

COUNTS = np.array([37, 29])  # real prompt tokens per row: padded to 64, so rows end inside different shards
STEPS = 20  # decode steps after the prompt: past a window (8), a CSA block (4) and an HCA block (16)
MAX_LEN, CHUNK = 128, 8  # 128 positions: latents and every entry array split evenly over 2, 4 or 8 shards
CONFIGS = {"M": ("tiny-v3", {}), "M+S": ("tiny-hybrid", {"window": 8}), "W+C+H": ("tiny-v4", {})}


@functools.cache
def setup(label):
    name, fields = CONFIGS[label]
    cfg = config.preset(name, **fields)
    params = scaled_params(cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, COUNTS.max() + STEPS), 0, cfg.vocab_size))
    full = np.asarray(model.forward(cfg, params, tokens))
    rows = np.arange(2)
    expected = np.stack([full[rows, COUNTS - 1 + i] for i in range(STEPS + 1)], 1)  # [b, 1 + steps, vocab]
    return cfg, params, tokens, expected


def prefill_then_decode(cfg, params, tokens, mesh):
    """Logits at each row's last prompt token, then at each of STEPS greedy-free decode steps (the next tokens
    are taken from `tokens`), and the cache."""
    params = jax.device_put(params, state_shardings(model.abstract(cfg), mesh, "serve"))
    cache = cache_lib.init_cache(cfg, 2, MAX_LEN, mesh=mesh)
    last, cache = decode.prefill(cfg, params, cache, tokens[:, :COUNTS.max()], COUNTS, chunk=CHUNK)
    out, position = [np.asarray(last)], COUNTS.copy()
    for _ in range(STEPS):
        logits, cache = decode.decode_step(cfg, params, cache, tokens[np.arange(2), position], np.ones(2, bool))
        out.append(np.asarray(logits))
        position += 1
    return np.stack(out, 1), cache


@pytest.mark.parametrize("label, axes", [("M", {"context": 4}), ("M+S", {"context": 8}),
                                         ("M+S", {"data": 2, "context": 2}), ("W+C+H", {"context": 4})])
def test_split_prefill_then_decode_equals_the_forward(label, axes):
    cfg, params, tokens, expected = setup(label)
    mesh = make_mesh(**axes)
    with jax.set_mesh(mesh):
        assert decode.context_shards() == axes["context"]
        ours, cache = prefill_then_decode(cfg, params, tokens, mesh)
    err = np.abs(ours - expected).max(axis=-1) / np.abs(expected).max()  # [b, 1 + steps]
    assert err.max() < 1e-4, (label, axes, np.round(err, 6))
    assert np.asarray(cache.lengths).tolist() == (COUNTS + STEPS).tolist()
    # The arrays that grow with max_len came back split over `context`.
    for layer in (*cache.prefix, *cache.suffix):
        for name in {"latents", "entries", "index_keys"} & set(layer):
            assert "context" in str(layer[name].sharding.spec), (name, layer[name].sharding.spec)


def test_the_split_pass_is_what_runs():
    """A long prompt into empty rows compiles one program with the context bodies' collectives (the zig-zag swap
    and halo permutes); a prompt within one chunk, or rows already holding tokens, take the chunked path."""
    cfg, params, tokens, _ = setup("M+S")
    mesh = make_mesh(context=4)
    with jax.set_mesh(mesh):
        cache = cache_lib.init_cache(cfg, 2, MAX_LEN, mesh=mesh)
        length = decode.split_prefill_length(cfg, int(COUNTS.max()), 4, CHUNK)
        hlo = decode._prefill_chunk.lower(cfg, params, cache, np.zeros((2, length), np.int32), COUNTS,
                                          True).compile().as_text()
    assert "collective-permute" in hlo


@pytest.mark.parametrize("tokens, shards, chunk, expected", [
    (37, 4, 8, 64),  # whole 16-token HCA blocks per shard: 4 x 16
    (65, 4, 8, 128),
    (5, 8, 8, 128),  # a window of 8 needs 7 halo tokens per shard: 8 x 7 = 56, rounded to 8 x 16
    (37, 2, 48, 96),  # a multiple of both 2 x 16 and the chunk
])
def test_split_prefill_length(tokens, shards, chunk, expected):
    cfg = config.preset("tiny-v4")
    length = decode.split_prefill_length(cfg, tokens, shards, chunk)
    assert length == expected
    assert length % (shards * 16) == 0 and length // shards >= cfg.sliding_window - 1 and length >= tokens


def test_engine_on_a_context_mesh_gives_the_single_device_tokens():
    cfg = config.preset("tiny-v3")
    params = model.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (41, 9)]  # split prefill, chunked prefill

    def generate(mesh):
        engine = Engine(cfg, model.place(params, mesh, "serve"), slots=2, max_len=64, chunk=16, mesh=mesh,
                        warmup=False)
        requests = [engine.submit(p, SamplingParams(max_tokens=6)) for p in prompts]
        engine.run_until_idle()
        return [r.tokens for r in requests]

    alone = generate(None)
    assert generate(make_mesh(context=4)) == alone
    assert all(len(t) == 6 for t in alone)


@pytest.mark.parametrize("kind", list(AttentionKind), ids=lambda k: k.value)
@pytest.mark.parametrize("c", [2, 4])
def test_layer_prefill_bytes_match_cost_model(kind, c):
    """One layer's split prefill compiles to the forward's collectives plus the all-reduces that assemble the
    whole cache arrays: exactly `cost.prefill_context_bytes` for the busiest device, and nothing else moves."""
    cfg = config.preset("tiny-v4" if kind in (AttentionKind.WINDOW, AttentionKind.CSA, AttentionKind.HCA)
                        else "tiny-hybrid")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: attention.make(cfg, kind, nnx.Rngs(0))))
    length, batch = 64, 2
    cache = cached.cache_shapes(cfg, kind, batch, MAX_LEN, "float32")
    mesh = make_mesh(context=c)

    def fill(state, x, cache, count):
        return context.prefill(nnx.merge(graphdef, state), x, cache, count)

    def placed(name, leaf):
        split = cached.is_split(name, leaf.shape, c)
        return NamedSharding(mesh, P(None, "context") if split else P())

    x = jax.ShapeDtypeStruct((batch, length, cfg.hidden_size), jnp.float32)
    count = jax.ShapeDtypeStruct((batch,), jnp.int32)
    shardings = (NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "context")),
                 {name: placed(name, leaf) for name, leaf in cache.items()}, NamedSharding(mesh, P()))
    with use_rules(mesh_rules(mesh, "serve")), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        text = jax.jit(fill, in_shardings=shardings).lower(state, x, cache, count).compile().as_text()
    ops = {op.op for op in hlo.collectives(text)}
    assert ops <= {"collective-permute", "all-gather", "all-reduce"}, ops
    want = cost.prefill_context_bytes(cfg, kind, length, c, MAX_LEN, batch=batch, value_bytes=4)
    assert hlo.received_bytes(text) == want
    forward = cost.context_bytes(cfg, kind, length, c, batch=batch, value_bytes=4)
    assert want == forward if kind is AttentionKind.FULL else want > forward  # M's cache is sliced, not summed
