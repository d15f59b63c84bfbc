"""mHC oracle tests: v4jax.layers.hyper against transformers' DeepseekV4HyperConnection / DeepseekV4HyperHead.

Legend: b batch, t time, s streams, d model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

from v4jax import config
from v4jax.layers import hyper

B, T = 2, 5
TOL = 1e-5
# (hc_eps, rms_norm_eps): the defaults, and large values so a misplaced eps moves results far past TOL.
EPS_CASES = [(1e-6, 1e-6), (1e-2, 0.5)]


def _configs(hc_eps=1e-6, rms_eps=1e-6, iters=20):
    ours = config.preset("tiny-v4", hc_eps=hc_eps, rms_norm_eps=rms_eps, hc_sinkhorn_iters=iters)
    theirs = DeepseekV4Config(hidden_size=ours.hidden_size, hc_mult=ours.hc_mult, hc_sinkhorn_iters=iters,
                              hc_eps=hc_eps, rms_norm_eps=rms_eps, num_hidden_layers=2, vocab_size=128,
                              intermediate_size=64)
    return ours, theirs


def _randomize(module: torch.nn.Module, seed: int):
    """Weights far from init: fn large enough for a non-uniform comb, scale != 1, base != 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("fn"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("base"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
    return module


def _hyper_connection(cfg, hf: DeepseekV4HyperConnection) -> hyper.HyperConnection:
    ours = hyper.HyperConnection(cfg, nnx.Rngs(0))
    ours.fn[...] = jnp.asarray(hf.fn.detach().numpy().T)
    ours.base[...] = jnp.asarray(hf.base.detach().numpy())
    ours.scale[...] = jnp.asarray(hf.scale.detach().numpy())
    return ours


def _streams(cfg, seed=0, shape=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape or (B, T, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)


def _err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().double().numpy())))


@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("hc_eps,rms_eps", EPS_CASES)
def test_hyper_connection_matches_oracle(hc_eps, rms_eps, iters):
    cfg, hf_cfg = _configs(hc_eps, rms_eps, iters)
    hf = _randomize(DeepseekV4HyperConnection(hf_cfg), seed=iters)
    ours = _hyper_connection(cfg, hf)
    x = _streams(cfg)
    out = np.random.default_rng(1).standard_normal((B, T, cfg.hidden_size)).astype(np.float32)

    with torch.no_grad():
        post_ref, comb_ref, collapsed_ref = hf(torch.from_numpy(x))
        # The decoder layer's expand, as written in DeepseekV4DecoderLayer.forward.
        expanded_ref = post_ref.unsqueeze(-1) * torch.from_numpy(out).unsqueeze(-2) + torch.matmul(
            comb_ref.transpose(-1, -2), torch.from_numpy(x))
    collapsed, post, comb = ours(jnp.asarray(x))
    expanded = hyper.expand(jnp.asarray(out), jnp.asarray(x), post, comb)

    assert collapsed.shape == (B, T, cfg.hidden_size) and collapsed.dtype == jnp.float32
    assert post.shape == (B, T, cfg.hc_mult) and comb.shape == (B, T, cfg.hc_mult, cfg.hc_mult)
    errors = {"collapsed": _err(collapsed, collapsed_ref), "post": _err(post, post_ref),
              "comb": _err(comb, comb_ref), "expand": _err(expanded, expanded_ref)}
    print(f"hc_eps={hc_eps} rms_eps={rms_eps} iters={iters} max abs errors {errors}")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("hc_eps,rms_eps", EPS_CASES)
def test_hyper_head_matches_oracle(hc_eps, rms_eps):
    cfg, hf_cfg = _configs(hc_eps, rms_eps)
    hf = _randomize(DeepseekV4HyperHead(hf_cfg), seed=7)
    ours = hyper.HyperHead(cfg, nnx.Rngs(0))
    ours.fn[...] = jnp.asarray(hf.hc_fn.detach().numpy().T)
    ours.base[...] = jnp.asarray(hf.hc_base.detach().numpy())
    ours.scale[...] = jnp.asarray(hf.hc_scale.detach().numpy())
    x = _streams(cfg, seed=3)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x))
    got = ours(jnp.asarray(x))
    assert got.shape == (B, T, cfg.hidden_size) and got.dtype == jnp.float32
    print(f"hc_eps={hc_eps} rms_eps={rms_eps} head max abs error {_err(got, ref)}")
    assert _err(got, ref) < TOL


def test_comb_is_doubly_stochastic():
    cfg, hf_cfg = _configs()
    ours = _hyper_connection(cfg, _randomize(DeepseekV4HyperConnection(hf_cfg), seed=11))
    _, _, comb = ours(jnp.asarray(_streams(cfg, seed=5)))
    comb = np.asarray(comb)
    assert (comb > 0).all()
    # Columns are normalised last, so they are tight; rows have had 19 rounds to converge.
    np.testing.assert_allclose(comb.sum(axis=-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(comb.sum(axis=-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("iters", [3, 20])
def test_wrong_iteration_count_is_caught(iters):
    """An off-by-one in the Sinkhorn loop must move comb past the tolerance the oracle test uses."""
    cfg, hf_cfg = _configs(iters=iters)
    hf = _randomize(DeepseekV4HyperConnection(hf_cfg), seed=13)
    x = _streams(cfg, seed=2)
    with torch.no_grad():
        _, comb_ref, _ = hf(torch.from_numpy(x))
    for wrong in (iters - 1, iters + 1):
        wrong_cfg, _ = _configs(iters=wrong)
        _, _, comb = _hyper_connection(wrong_cfg, hf)(jnp.asarray(x))
        assert _err(comb, comb_ref) > TOL, (iters, wrong, _err(comb, comb_ref))


def test_expand_direction_matters():
    """comb is not symmetric: mixing with comb instead of comb^T must be caught."""
    cfg, hf_cfg = _configs()
    ours = _hyper_connection(cfg, _randomize(DeepseekV4HyperConnection(hf_cfg), seed=17))
    x = jnp.asarray(_streams(cfg, seed=4))
    out = jnp.asarray(_streams(cfg, seed=6, shape=(B, T, cfg.hidden_size)))
    _, post, comb = ours(x)
    right = hyper.expand(out, x, post, comb)
    wrong = hyper.expand(out, x, post, jnp.swapaxes(comb, -1, -2))
    assert float(jnp.max(jnp.abs(right - wrong))) > 1e-3


def test_bf16_dtypes_and_gradients():
    cfg, hf_cfg = _configs()
    hf = _randomize(DeepseekV4HyperConnection(hf_cfg), seed=19)
    ours = _hyper_connection(cfg, hf)
    x32 = _streams(cfg, seed=8)
    x = jnp.asarray(x32, jnp.bfloat16)
    collapsed, post, comb = ours(x)
    assert collapsed.dtype == jnp.bfloat16 and post.dtype == jnp.float32 and comb.dtype == jnp.float32
    expanded = hyper.expand(collapsed, x, post, comb)
    assert expanded.dtype == jnp.bfloat16 and expanded.shape == x.shape
    with torch.no_grad():  # the oracle on bf16 streams, fp32 parameters (as DeepseekV4DecoderLayer holds them)
        _, _, collapsed_ref = hf(torch.from_numpy(x32).to(torch.bfloat16))
    assert _err(collapsed.astype(jnp.float32), collapsed_ref) < 5e-2

    def loss(module, streams):
        c, p, m = module(streams)
        return jnp.sum(hyper.expand(c, streams, p, m).astype(jnp.float32) ** 2)

    grads = nnx.jit(nnx.grad(loss))(ours, jnp.asarray(x32))
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
