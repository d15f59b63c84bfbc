"""The model: invariance tests (fast == reference, S with a full window == M, scanned == unscanned, sharded == single
device, packed == separate) and shape-only tests (param counts and `abstract` of the full 671B preset, layouts).

Each distinct config costs a compile of several seconds on CPU, so tests share the session fixtures' configs and
the `tokens` fixture (int32 [4, 40]) wherever they can.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import model
from v4jax.config import AttentionKind, LayerSpec, MlpKind, preset
from v4jax.model import Layout, find_layout
from v4jax.sharding import make_mesh

VOCAB, T = 512, 40


def assert_close(actual, expected, atol=2e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-4)


def differ(a, b, by=1e-3) -> bool:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) > by


@pytest.fixture(scope="module")
def v3_logits(tiny_v3, tokens):
    cfg, params = tiny_v3
    return np.asarray(model.forward(cfg, params, tokens))


# `apply` (logits + MTP logits + MoE statistics) under one jit; `forward` returns the logits only.
apply = jax.jit(model.apply, static_argnums=0)


@pytest.fixture(scope="module")
def hybrid_out(tiny_hybrid, tokens):
    cfg, params = tiny_hybrid
    return jax.device_get(apply(cfg, params, tokens))


@pytest.fixture(scope="module")
def hybrid_logits(hybrid_out):
    return hybrid_out.logits


def test_forward_shape_and_dtype(v3_logits, hybrid_logits):
    for logits in (v3_logits, hybrid_logits):
        assert logits.shape == (4, T, VOCAB) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        assert logits.std() > 1e-3  # not a constant
    # Different rows (different tokens) give different logits.
    assert differ(v3_logits[0], v3_logits[1])


def test_forward_rejects_bad_token_rank(tiny_v3):
    cfg, params = tiny_v3
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model.forward(cfg, params, jnp.zeros((T,), jnp.int32))


def test_reference_path_equals_fast_path(tiny_hybrid, tokens, hybrid_logits):
    """Dense masked attention + every-expert MoE == blockwise/banded attention + capacity-exact einsum MoE."""
    cfg, params = tiny_hybrid
    reference = model.forward(cfg.replace(attention_impl="reference", moe_impl="dense"), params, tokens)
    assert_close(hybrid_logits, reference)
    # Blocks smaller than the sequence and the window (16): several query blocks, a band wider than one block.
    small_blocks = model.forward(cfg.replace(attention_block_size=8), params, tokens)
    assert_close(small_blocks, reference)


# ---------------------------------------------------------------------------------------------------------------
# sliding window vs full attention


def test_sliding_with_window_covering_the_sequence_equals_full(tiny_v3, tokens, v3_logits):
    cfg, params = tiny_v3
    sliding = preset("tiny-v3", pattern="SSSS", window=T)  # window == T: every query sees its whole prefix
    assert sliding.explicit_pattern == "SSSS"
    # Same parameter tree (M and S share the MLA weights), so the very same params run both.
    assert model.layout(sliding) == model.layout(cfg)
    assert jax.tree.structure(model.abstract(sliding)) == jax.tree.structure(model.abstract(cfg))
    assert_close(model.forward(sliding, params, tokens), v3_logits)


def test_window_smaller_than_sequence_changes_logits(tiny_v3, tokens, v3_logits):
    cfg, params = tiny_v3
    window = 8
    logits = np.asarray(model.forward(preset("tiny-v3", pattern="MSSS", window=window), params, tokens))
    assert differ(logits[:, window:], v3_logits[:, window:])
    # Queries earlier than the window's length see their whole prefix either way.
    assert_close(logits[:, :window], v3_logits[:, :window])


# ---------------------------------------------------------------------------------------------------------------
# scanned vs unscanned, per-layer views


def test_split_merge_round_trip(tiny_hybrid):
    cfg, params = tiny_hybrid
    rest, layers = model.split_layers(cfg, params)
    assert len(layers) == cfg.num_hidden_layers == 9
    assert set(rest) == {"embed", "head", "norm", "mtp"}
    pure = nnx.to_pure_dict(params)
    # Layer 5 is repeat 1, position 0 of the unit (after the 1-layer prefix); layer 0 is the prefix.
    np.testing.assert_array_equal(layers[5]["attn"]["wq_b"], pure["unit"]["blocks"][0]["attn"]["wq_b"][1])
    np.testing.assert_array_equal(layers[3]["mlp"]["experts"]["gate"],
                                  pure["unit"]["blocks"][2]["mlp"]["experts"]["gate"][0])
    np.testing.assert_array_equal(layers[0]["mlp"]["gate"], pure["prefix"][0]["mlp"]["gate"])
    merged = model.merge_layers(cfg, rest, layers)
    flat_a, flat_b = jax.tree.leaves(nnx.to_pure_dict(merged)), jax.tree.leaves(pure)
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="expected 9 layers"):
        model.merge_layers(cfg, rest, layers[:-1])


def random_params(cfg, seed=0):
    """Host parameters for `cfg` from numpy (no compile): each leaf distinct, so a misplaced layer shows."""
    state = model.abstract(cfg)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return state


def test_split_merge_across_layouts_with_a_suffix():
    scanned = preset("tiny-v3", pattern="[MSSS]*2MM", first_dense_layers=0, num_nextn_predict_layers=0)
    assert model.layout(scanned) == Layout(prefix=0, unit=4, repeats=2, suffix=2)
    params = random_params(scanned)
    rest, layers = model.split_layers(scanned, params)
    pure = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(layers[9]["attn"]["wo"], pure["suffix"][1]["attn"]["wo"])
    np.testing.assert_array_equal(layers[6]["attn"]["wo"], pure["unit"]["blocks"][2]["attn"]["wo"][1])
    # Into the unscanned model and back: every layer in its place.
    unscanned = scanned.replace(scan_layers=False)
    moved = model.merge_layers(unscanned, rest, layers)
    assert set(nnx.to_pure_dict(moved)["prefix"]) == set(range(10))
    _, back = model.split_layers(unscanned, moved)
    for i, (a, b) in enumerate(zip(back, layers, strict=True)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(i))
    rescanned = model.merge_layers(scanned, *model.split_layers(unscanned, moved))
    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(rescanned)), jax.tree.leaves(pure), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_scanned_equals_unscanned(tiny_hybrid, tokens, hybrid_out):
    cfg, params = tiny_hybrid
    unscanned = cfg.replace(scan_layers=False)
    assert model.layout(unscanned) == Layout(prefix=9, unit=0, repeats=0, suffix=0)
    unscanned_params = model.merge_layers(unscanned, *model.split_layers(cfg, params))
    assert "unit" not in nnx.to_pure_dict(unscanned_params)
    out = jax.device_get(apply(unscanned, unscanned_params, tokens))
    assert_close(out.logits, hybrid_out.logits)
    assert_close(out.mtp_logits, hybrid_out.mtp_logits)
    # Per-layer statistics come back in depth order from the scan too (8 MoE layers + MTP, each its own load).
    assert out.expert_load.shape == hybrid_out.expert_load.shape == (9, 8)
    np.testing.assert_array_equal(hybrid_out.expert_load, out.expert_load)
    assert len({tuple(row) for row in out.expert_load}) > 4


# ---------------------------------------------------------------------------------------------------------------
# sharded == single device


@pytest.mark.parametrize("family", ["tiny_v3", "tiny_hybrid"])
def test_sharded_forward_equals_single_device(request, family, tokens):
    cfg, single_params = request.getfixturevalue(family)
    expected = request.getfixturevalue("v3_logits" if family == "tiny_v3" else "hybrid_logits")
    mesh = make_mesh(data=2, expert=2, tensor=2)
    params = model.init(cfg, jax.random.key(0), mesh=mesh)
    gate = nnx.to_pure_dict(params)["unit"]["blocks"][0]["mlp"]["experts"]["gate"]
    assert len(gate.sharding.device_set) == 8 and gate.addressable_shards[0].data.shape[1] == 4  # 8 experts / 2
    with jax.set_mesh(mesh):
        logits = model.forward(cfg, params, tokens)
    assert logits.shape == (4, T, VOCAB)
    assert_close(logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# packing


def test_packed_sequences_equal_separate_runs(tiny_hybrid):
    """Two documents packed in one row (segment ids, positions restarting) == each run alone. A and B are longer
    than the `S` window (16), so both the blockwise and the banded kernels see the segment boundary."""
    cfg, params = tiny_hybrid
    rng = np.random.default_rng(7)
    la, lb = 22, T - 22
    a, b = rng.integers(0, VOCAB, la), rng.integers(0, VOCAB, lb)
    filler = rng.integers(0, VOCAB, T)
    tokens = np.stack([
        np.concatenate([a, b]),  # packed
        np.concatenate([a, filler[:lb]]),  # A alone (later tokens cannot affect it: causal)
        np.concatenate([b, filler[:la]]),  # B alone
        np.concatenate([a, b]),  # A and B as one document: B's logits must differ
        np.concatenate([a, filler[:lb]]),  # A alone, positions shifted by 100
    ])
    arange = np.arange(T)
    packed_positions = np.concatenate([np.arange(la), np.arange(lb)])
    positions = np.stack([packed_positions, arange, arange, arange, arange + 100]).astype(np.int32)
    segment_ids = np.zeros((5, T), np.int32)
    segment_ids[0, la:] = 1
    logits = np.asarray(model.forward(cfg, params, tokens, positions=positions, segment_ids=segment_ids))
    assert_close(logits[0, :la], logits[1, :la])
    assert_close(logits[0, la:], logits[2, :lb])
    assert differ(logits[3, la:], logits[2, :lb])  # without the segment boundary B sees A
    assert_close(logits[3, :la], logits[1, :la])
    # RoPE only sees relative positions: a shift of every position changes nothing (so positions restarting per
    # segment matters for the cache and long-context scaling, not for these logits).
    assert_close(logits[4], logits[1], atol=5e-5)


# ---------------------------------------------------------------------------------------------------------------
# MTP and statistics


@pytest.fixture(scope="module")
def v3_apply(tiny_v3, tokens):
    cfg, params = tiny_v3
    changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % VOCAB)
    return jax.device_get(apply(cfg, params, tokens)), jax.device_get(apply(cfg, params, changed))


def test_mtp_logits(v3_apply, v3_logits):
    out, changed = v3_apply
    assert out.mtp_logits.shape == (4, T, VOCAB) and out.mtp_logits.dtype == np.float32
    assert_close(out.logits, v3_logits)
    # Position t's MTP head reads the embedding of token t + 1: changing token 20 changes MTP position 19 ...
    assert differ(changed.mtp_logits[:, 19], out.mtp_logits[:, 19])
    # ... while causality keeps everything before it as it was (main logits up to 19, MTP up to 18).
    assert_close(changed.logits[:, :20], out.logits[:, :20], atol=1e-6)
    assert_close(changed.mtp_logits[:, :19], out.mtp_logits[:, :19], atol=1e-6)
    assert differ(changed.logits[:, 20], out.logits[:, 20])
    assert differ(out.mtp_logits, out.logits)  # a different head, not a copy


def test_moe_statistics(v3_apply):
    out, _ = v3_apply
    # 3 MoE layers in the main stack + the MTP block's MoE.
    assert out.expert_load.shape == (4, 8) and out.dropped_fraction.shape == (4,)
    np.testing.assert_array_equal(out.expert_load.sum(-1), 4 * T * 2)  # tokens * top-k per layer
    np.testing.assert_array_equal(out.dropped_fraction, 0.0)  # exact capacity by default


# ---------------------------------------------------------------------------------------------------------------
# shape-only: the full preset, without allocating


def test_param_counts_deepseek_v3_671b():
    cfg = preset("deepseek-v3-671b")
    start = time.perf_counter()
    total, active = model.param_counts(cfg)
    assert time.perf_counter() - start < 30  # eval_shape only: seconds, no 2.7 TB of float32
    assert abs(total - 671e9) / 671e9 < 0.01, total
    assert abs(active - 37e9) / 37e9 < 0.03, active
    with_mtp, _ = model.param_counts(cfg, include_mtp=True)
    assert 10e9 < with_mtp - total < 13e9  # the MTP module (V3's 685B - 671B, most of it one MoE layer)


def test_param_counts_match_the_parameters(tiny_v3):
    cfg, params = tiny_v3
    total = expert = embed = 0
    for path, variable in nnx.to_flat_state(params):
        if not isinstance(variable, nnx.Param) or path[0] == "mtp":
            continue  # the router bias is state, not a parameter; MTP is counted separately
        total += variable.size
        expert += variable.size if "experts" in path else 0
        embed += variable.size if path[0] == "embed" else 0
    got_total, got_active = model.param_counts(cfg)
    assert got_total == total
    assert got_active == total - embed - expert + expert * 2 // 8


def test_abstract_deepseek_v3_671b():
    cfg = preset("deepseek-v3-671b")
    assert model.layout(cfg) == Layout(prefix=3, unit=1, repeats=58, suffix=0)
    start = time.perf_counter()
    state = nnx.to_pure_dict(model.abstract(cfg))
    assert time.perf_counter() - start < 30
    experts = state["unit"]["blocks"][0]["mlp"]["experts"]
    assert experts["gate"].shape == (58, 256, 7168, 2048)
    assert experts["down"].shape == (58, 256, 2048, 7168)
    assert isinstance(experts["gate"], jax.ShapeDtypeStruct) and experts["gate"].dtype == jnp.float32
    assert state["prefix"][2]["mlp"]["gate"].shape == (7168, 18432)
    assert state["unit"]["blocks"][0]["attn"]["wq_b"].shape == (58, 1536, 128, 192)
    assert state["embed"]["embedding"].shape == (129_280, 7168)
    # With a mesh: every parameter gets a sharding, experts split on 'expert'.
    sharded = nnx.to_pure_dict(model.abstract(cfg, make_mesh(fsdp=2, expert=2, tensor=2)))
    spec = tuple(sharded["unit"]["blocks"][0]["mlp"]["experts"]["gate"].sharding.spec)
    assert spec[:3] == (None, "expert", "fsdp")


def test_abstract_without_query_lora():
    """q_lora_rank=None (V2-Lite style): a direct [embed, heads, head_dim] query projection instead of the LoRA."""
    attn = nnx.to_pure_dict(model.abstract(preset("tiny-v3", q_lora_rank=None)))["prefix"][0]["attn"]
    assert attn["wq"].shape == (64, 4, 24)
    assert "wq_a" not in attn and "wq_b" not in attn and "q_norm" not in attn


# ---------------------------------------------------------------------------------------------------------------
# layouts


def specs(pattern: str, first_dense: int = 0):
    return preset("tiny-v3", pattern=pattern, first_dense_layers=first_dense).layers


@pytest.mark.parametrize("layers, expected", [
    (preset("tiny-hybrid").layers, Layout(prefix=1, unit=4, repeats=2, suffix=0)),
    (preset("tiny-v3").layers, Layout(prefix=1, unit=1, repeats=3, suffix=0)),
    (preset("deepseek-v3-671b").layers, Layout(prefix=3, unit=1, repeats=58, suffix=0)),
    (specs("[MSSS]*2"), Layout(prefix=0, unit=4, repeats=2, suffix=0)),
    (specs("[MSSS]*2MM"), Layout(prefix=0, unit=4, repeats=2, suffix=2)),
    (specs("[MS]*3", first_dense=2), Layout(prefix=2, unit=2, repeats=2, suffix=0)),
    (specs("MMMM"), Layout(prefix=0, unit=1, repeats=4, suffix=0)),
    (specs("MS"), Layout(prefix=2, unit=0, repeats=0, suffix=0)),  # nothing repeats: all unrolled
    (specs("MSM"), Layout(prefix=3, unit=0, repeats=0, suffix=0)),
])
def test_find_layout(layers, expected):
    got = find_layout(layers)
    assert got == expected
    assert got.prefix + got.unit * got.repeats + got.suffix == len(layers)
    # The scanned copies really are identical.
    start = got.prefix
    unit = layers[start:start + got.unit]
    assert all(layers[start + r * got.unit:start + (r + 1) * got.unit] == unit for r in range(got.repeats))


def test_find_layout_without_scan():
    assert find_layout(preset("tiny-hybrid").layers, scan=False) == Layout(prefix=9, unit=0, repeats=0, suffix=0)


def test_layout_locate():
    lay = Layout(prefix=1, unit=4, repeats=2, suffix=2)
    located = [lay.locate(i) for i in range(11)]
    assert located[0] == ("prefix", 0, 0)
    assert located[1:5] == [("unit", 0, j) for j in range(4)]
    assert located[5:9] == [("unit", 1, j) for j in range(4)]
    assert located[9:] == [("suffix", 0, 0), ("suffix", 0, 1)]


def test_layout_unit_mixes_layer_kinds():
    layers = preset("tiny-hybrid").layers
    lay = find_layout(layers)
    assert [s.attention for s in layers[lay.prefix:lay.prefix + lay.unit]] == [AttentionKind.SLIDING] * 3 + [
        AttentionKind.FULL]
    assert layers[0] == LayerSpec(AttentionKind.FULL, MlpKind.DENSE)


def test_tied_embedding_counts_as_active_head():
    from v4jax import config

    untied = model.param_counts(config.preset("tiny-v3"))
    tied = model.param_counts(config.preset("tiny-v3", tie_word_embeddings=True))
    cfg = config.preset("tiny-v3")
    table = cfg.vocab_size * cfg.hidden_size
    assert tied[0] == untied[0] - table  # no separate head
    assert tied[1] == untied[1]  # the table replaces the head among what a token multiplies by


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V4 (W / C / H attention, mHC streams, hash routing, V4 MTP)


@pytest.fixture(scope="module")
def tiny_v4():
    from v4jax import config

    cfg = config.preset("tiny-v4")
    return cfg, model.init(cfg, jax.random.key(0))


@pytest.mark.parametrize("name, total, active, total_tol, active_tol", [
    ("deepseek-v4-flash", 284e9, 13e9, 0.01, 0.03),
    ("deepseek-v4-pro", 1.6e12, 49e9, 0.02, 0.03),
])
def test_v4_param_counts_match_published(name, total, active, total_tol, active_tol):
    from v4jax import config

    got_total, got_active = model.param_counts(config.preset(name))
    assert abs(got_total - total) / total < total_tol, got_total
    assert abs(got_active - active) / active < active_tol, got_active


def test_v4_flash_scanned_unit_is_found_automatically():
    from v4jax import config

    lay = model.layout(config.preset("deepseek-v4-flash"))
    # layers 0-2 are hash-routed (W, W, C), then [H C] x 20 with learned routing
    assert (lay.prefix, lay.unit, lay.repeats, lay.suffix) == (3, 2, 20, 0)


def test_v4_fast_path_equals_reference_and_sharded_equals_single(tiny_v4):
    from v4jax import config, sharding

    cfg, params = tiny_v4
    tokens = jax.random.randint(jax.random.key(7), (4, 48), 0, cfg.vocab_size)
    single = jax.jit(lambda p, t: model.apply(cfg, p, t))(params, tokens)
    reference = jax.jit(lambda p, t: model.apply(cfg.replace(attention_impl="reference", moe_impl="dense"), p, t))(
        params, tokens)
    np.testing.assert_allclose(single.logits, reference.logits, atol=2e-5)
    np.testing.assert_allclose(single.mtp_logits, reference.mtp_logits, atol=2e-5)
    mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
    sharded_params = model.init(cfg, jax.random.key(0), mesh=mesh)
    with jax.set_mesh(mesh):
        sharded = model.forward(cfg, sharded_params, tokens)
    np.testing.assert_allclose(sharded, single.logits, atol=2e-5)
    assert single.expert_load.shape == (cfg.num_hidden_layers + 1, cfg.n_routed_experts)
    assert config.preset("tiny-v4").hc_mult == 4


def test_v4_hash_layers_route_by_token_id(tiny_v4):
    """Hash layers pick experts from the frozen table: the same token always reaches the same experts."""
    cfg, params = tiny_v4
    tokens = jnp.full((1, 16), 7, jnp.int32)
    load = jax.jit(lambda p, t: model.apply(cfg, p, t).expert_load)(params, tokens)
    for layer in range(cfg.first_hash_layers):
        assert int((load[layer] > 0).sum()) == cfg.num_experts_per_tok


def test_v4_packed_documents_equal_separate_runs(tiny_v4):
    """Window, compressed entries and the indexer all stay inside their document (blocks aligned to it here)."""
    cfg, params = tiny_v4
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, cfg.vocab_size, (1, 16)), rng.integers(0, cfg.vocab_size, (1, 32))
    packed = jnp.asarray(np.concatenate([a, b], axis=1), jnp.int32)
    segments = jnp.asarray([[0] * 16 + [1] * 32], jnp.int32)
    positions = jnp.asarray([list(range(16)) + list(range(32))], jnp.int32)
    together = model.forward(cfg, params, packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(together[:, :16], model.forward(cfg, params, jnp.asarray(a, jnp.int32)), atol=2e-5)
    np.testing.assert_allclose(together[:, 16:], model.forward(cfg, params, jnp.asarray(b, jnp.int32)), atol=2e-5)


def test_v4_sequences_shorter_than_a_compressed_block(tiny_v4):
    """3 tokens: no CSA (ratio 4) or HCA (ratio 16) entry exists yet; the layers fall back to their window."""
    cfg, params = tiny_v4
    logits = model.forward(cfg, params, jnp.asarray([[1, 2, 3]], jnp.int32))
    assert logits.shape == (1, 3, cfg.vocab_size) and bool(jnp.isfinite(logits).all())


def test_param_dtype_stores_parameters_in_it(tiny_v3):
    """`param_dtype="bfloat16"` (serving) halves the weights: init, abstract and HF-style merges all give bf16
    trainable parameters; router biases keep float32; the forward reads them in the compute dtype."""
    cfg, params = tiny_v3
    half = cfg.replace(param_dtype="bfloat16")
    for state in (model.abstract(half), model.init(half, jax.random.key(0))):
        dtypes = {path: v.dtype for path, v in state.flat_state()}
        trainable = [p for p, v in state.flat_state() if isinstance(v, nnx.Param)]
        assert all(dtypes[p] == jnp.bfloat16 for p in trainable)
        assert any(dtypes[p] == jnp.float32 for p in dtypes if p not in set(trainable))  # router biases
    rest, layers = model.split_layers(cfg, params)
    merged = model.merge_layers(half, rest, layers)
    assert all(v.dtype == jnp.bfloat16 for _, v in merged.flat_state() if isinstance(v, nnx.Param))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    full, rounded = model.forward(cfg, params, tokens), model.forward(half, merged, tokens)
    assert rounded.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(full - rounded)) / jnp.max(jnp.abs(full)))
    assert 0 < rel < 0.05  # bf16 rounding of the weights only
