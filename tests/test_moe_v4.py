"""DeepSeek-V4 MoE: sqrt-softplus top-k and hash routing, the SwiGLU clamp, and the whole block against
transformers' `DeepseekV4SparseMoeBlock` (both router kinds, every expert back end), in float32.

Legend: n tokens, d model, e experts, f expert width, k top-k, v vocab.
Everything of ours runs inside jit: eager calls on this CPU compile one kernel per op and shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import MlpKind, preset
from v4jax.layers.linear import fill_random
from v4jax.moe.moe import MoE
from v4jax.moe.routing import HashRouter, HashTable, RoundRobinTable, Router, RouterBias

CFG = preset("tiny-v4", capacity_factor=None)  # sqrtsoftplus, 8 experts, top-2, 1 shared, swiglu_limit 10
D, E, K, F, V = CFG.hidden_size, CFG.n_routed_experts, CFG.num_experts_per_tok, CFG.moe_intermediate_size, CFG.vocab_size
B, T = 2, 24
IMPLS = ("dense", "einsum", "ragged")
KINDS = {"hash": MlpKind.HASH, "topk": MlpKind.MOE}


def sqrtsoftplus(x):
    return np.sqrt(np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0))


def distinct_table(rng, vocab=V):
    """A tid2eid table with k distinct valid experts per token, drawn at random."""
    return np.stack([rng.permutation(E)[:K] for _ in range(vocab)]).astype(np.int32)


def by_expert(weights, indices):
    """Per token, (indices, weights) sorted by expert id: top-k order is not part of the contract."""
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(indices, order, -1), np.take_along_axis(weights, order, -1)


# ---------------------------------------------------------------------------------------------------------------
# routers against numpy


@functools.partial(jax.jit, static_argnums=0)
def run_router(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def test_sqrtsoftplus_router_matches_numpy():
    rng = np.random.default_rng(0)
    n = 96
    x = rng.standard_normal((n, D)).astype(np.float32)
    weight = (0.3 * rng.standard_normal((D, E))).astype(np.float32)
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32)
    router = Router(CFG, nnx.Rngs(params=0))
    router.weight.set_value(jnp.asarray(weight))
    router.bias.set_value(jnp.asarray(bias))
    weights, indices = jax.device_get(run_router(*nnx.split(router), jnp.asarray(x)))

    scores = sqrtsoftplus(x.astype(np.float64) @ weight.astype(np.float64))
    want_i = np.argsort(-(scores + bias), axis=-1, kind="stable")[:, :K]  # n_group=1: no group limit
    want_w = np.take_along_axis(scores, want_i, -1)
    want_w = want_w / want_w.sum(-1, keepdims=True) * CFG.routed_scaling_factor
    got_i, got_w = by_expert(weights, indices)
    want_i, want_w = by_expert(want_w, want_i)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    # Sharp: the bias moves some tokens to other experts.
    unbiased = np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :K], -1)
    assert (unbiased != want_i).any(-1).sum() >= 5


def test_hash_router_follows_table_and_has_no_bias():
    rng = np.random.default_rng(1)
    n = 64
    x = rng.standard_normal((n, D)).astype(np.float32)
    weight = (0.5 * rng.standard_normal((D, E))).astype(np.float32)
    table = distinct_table(rng)
    tokens = rng.integers(0, V, n).astype(np.int32)
    moe = MoE(CFG, nnx.Rngs(params=0), MlpKind.HASH)
    router = moe.router
    assert isinstance(router, HashRouter) and isinstance(router.tid2eid, HashTable)
    assert not isinstance(router.tid2eid, nnx.Param)
    assert not jax.tree.leaves(nnx.state(moe, RouterBias))  # nothing for the bias update to touch
    router.weight.set_value(jnp.asarray(weight))
    router.tid2eid.set_value(jnp.asarray(table))
    weights, indices = jax.device_get(run_router(*nnx.split(router), jnp.asarray(x), jnp.asarray(tokens)))

    np.testing.assert_array_equal(indices, table[tokens])  # the table's order, not re-sorted by score
    scores = sqrtsoftplus(x.astype(np.float64) @ weight.astype(np.float64))
    want = np.take_along_axis(scores, table[tokens], -1)
    want = want / want.sum(-1, keepdims=True) * CFG.routed_scaling_factor
    np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-6)
    # The learned scores would have chosen differently for most tokens: the table, not the gate, decides.
    top = np.sort(np.argsort(-scores, axis=-1)[:, :K], -1)
    assert (top != np.sort(table[tokens], -1)).any(-1).mean() > 0.5


def test_hash_layer_needs_tokens():
    moe = MoE(CFG, nnx.Rngs(params=0), MlpKind.HASH)
    x = jnp.zeros((1, 4, D), jnp.float32)
    with pytest.raises(ValueError, match="token id"):
        moe(x)
    with pytest.raises(ValueError, match="one id per position"):
        moe(x, jnp.zeros((1, 3), jnp.int32))


def test_fill_random_gives_a_valid_hash_table():
    abstract = nnx.split(nnx.eval_shape(lambda: MoE(CFG, nnx.Rngs(params=0), MlpKind.HASH)))[1]
    state = jax.jit(lambda key: fill_random(abstract, key))(jax.random.key(0))
    table = np.asarray(state["router"]["tid2eid"][...])
    assert table.dtype == np.int32 and table.shape == (V, K)
    assert ((0 <= table) & (table < E)).all()
    assert all(len(set(row)) == K for row in table)  # k distinct experts per token
    load = np.bincount(table.reshape(-1), minlength=E)
    assert load.max() - load.min() <= 1  # balanced over the vocabulary
    # Everything else is drawn as `param` declared: normal gate and experts, nothing left at zero.
    assert np.asarray(state["router"]["weight"][...]).std() > 0.5 * CFG.initializer_range
    # A stacked (scanned `layers`) table repeats the same valid table.
    stacked = RoundRobinTable(E)(None, (3, V, K), jnp.int32)
    np.testing.assert_array_equal(np.asarray(stacked), np.broadcast_to(table, (3, V, K)))
    assert RoundRobinTable(E) == RoundRobinTable(E)  # metadata compares by value: one pytree structure per config


# ---------------------------------------------------------------------------------------------------------------
# the whole block against transformers


def hf_block(kind: str, rng):
    """A random HF `DeepseekV4SparseMoeBlock` with weights large enough that the SwiGLU clamp binds."""
    import torch
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    config = DeepseekV4Config(
        vocab_size=V, hidden_size=D, moe_intermediate_size=F, num_hidden_layers=2, n_routed_experts=E,
        n_shared_experts=1, num_experts_per_tok=K, routed_scaling_factor=CFG.routed_scaling_factor,
        scoring_func="sqrtsoftplus", swiglu_limit=CFG.swiglu_limit, mlp_layer_types=["hash_moe", "moe"],
        num_attention_heads=4, head_dim=32, q_lora_rank=32)
    config._experts_implementation = "eager"  # the per-expert loop (the block is used standalone, not via a model)
    block = DeepseekV4SparseMoeBlock(config, 0 if kind == "hash" else 1).float().eval()
    assert block.is_hash == (kind == "hash")

    def normal(shape, std):
        return torch.from_numpy((std * rng.standard_normal(shape)).astype(np.float32))

    with torch.no_grad():
        block.gate.weight.copy_(normal((E, D), 0.3))
        if kind == "hash":
            block.gate.tid2eid.copy_(torch.from_numpy(distinct_table(rng)).long())
        else:
            block.gate.e_score_correction_bias.copy_(normal((E,), 0.3))
        # Pre-activations have std ~ 0.6 * sqrt(64) ~ 5, so a few percent pass the limit of 10.
        block.experts.gate_up_proj.copy_(normal((E, 2 * F, D), 0.6))
        block.experts.down_proj.copy_(normal((E, D, F), 0.02))
        for name in ("gate_proj", "up_proj"):
            getattr(block.shared_experts, name).weight.copy_(normal((F, D), 0.6))
        block.shared_experts.down_proj.weight.copy_(normal((D, F), 0.02))
    return block


def hf_to_ours(block, moe: MoE):
    """HF Linear weights are [out, in], ours [in, out]; gate_up_proj [e, 2f, d] holds the gate rows, then up."""
    def t(tensor):
        return jnp.asarray(tensor.detach().numpy())

    moe.router.weight.set_value(t(block.gate.weight.T))
    if block.is_hash:
        moe.router.tid2eid.set_value(t(block.gate.tid2eid).astype(jnp.int32))
    else:
        moe.router.bias.set_value(t(block.gate.e_score_correction_bias))
    gate_up = block.experts.gate_up_proj.detach()
    moe.experts.gate.set_value(t(gate_up[:, :F].transpose(1, 2)))
    moe.experts.up.set_value(t(gate_up[:, F:].transpose(1, 2)))
    moe.experts.down.set_value(t(block.experts.down_proj.transpose(1, 2)))
    for name in ("gate", "up", "down"):
        getattr(moe.shared, name).set_value(t(getattr(block.shared_experts, name + "_proj").weight.T))


@pytest.fixture(scope="module")
def hf_comparison():
    """Per router kind: HF's output and ours under every back end (plus ours unclamped), for one input."""
    import torch

    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    results = {}
    for kind, mlp_kind in KINDS.items():
        block = hf_block(kind, rng)
        with torch.no_grad():
            want = block(torch.from_numpy(x), torch.from_numpy(tokens).long()).numpy()
        moe = MoE(CFG, nnx.Rngs(params=0), mlp_kind)
        hf_to_ours(block, moe)
        _, state = nnx.split(moe)
        variants = {impl: CFG.replace(moe_impl=impl) for impl in IMPLS}
        variants["unclamped"] = CFG.replace(moe_impl="dense", swiglu_limit=None)
        graphdefs = {name: nnx.graphdef(nnx.eval_shape(lambda c=c: MoE(c, nnx.Rngs(params=0), mlp_kind)))
                     for name, c in variants.items()}

        @jax.jit
        def run(state, x, tokens):
            return {name: nnx.merge(g, state)(x, tokens) for name, g in graphdefs.items()}

        out = jax.device_get(run(state, jnp.asarray(x), jnp.asarray(tokens)))
        # Pre-activations from HF's own weights (routed: every expert on every token), to see the clamp bind.
        routed = np.einsum("btd,efd->btef", x, block.experts.gate_up_proj.detach().numpy())
        shared = np.concatenate([x @ getattr(block.shared_experts, name).weight.detach().numpy().T
                                 for name in ("gate_proj", "up_proj")], -1)
        results[kind] = dict(want=want, out=out, pre_activations=dict(routed=routed, shared=shared))
    return results


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_block_matches_hf(hf_comparison, kind, impl):
    result = hf_comparison[kind]
    y, stats = result["out"][impl]
    want = result["want"]
    assert y.shape == want.shape == (B, T, D)
    err = float(np.abs(y - want).max())
    print(f"{kind}/{impl}: max abs error {err:.2e} (output max {np.abs(want).max():.2f})")
    assert err < 1e-5
    assert float(stats["dropped_fraction"]) == 0.0
    assert stats["expert_load"].sum() == B * T * K


@pytest.mark.parametrize("kind", list(KINDS))
def test_swiglu_clamp_binds(hf_comparison, kind):
    """Guard for the comparison above: the clamp changes the output, so matching HF means we clamp as it does."""
    result = hf_comparison[kind]
    limit = CFG.swiglu_limit
    for name, pre in result["pre_activations"].items():
        gate, up = pre[..., :F], pre[..., F:]
        assert (gate > limit).mean() > 0.005 and (np.abs(up) > limit).mean() > 0.005, name
    clamped, unclamped = result["out"]["dense"][0], result["out"]["unclamped"][0]
    assert np.abs(clamped - unclamped).max() > 1e-2
