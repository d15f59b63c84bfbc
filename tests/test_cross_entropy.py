"""The fused head + cross-entropy: the same losses and gradients as materialised logits and a log-softmax."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import config, model
from v4jax.layers.cross_entropy import head_cross_entropy
from v4jax.training import step
from v4jax.training.config import TrainConfig


def plain(h, kernel, targets):
    logits = jnp.einsum("btd,dv->btv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    return step.token_cross_entropy(logits, targets)


def weighted(fn, h, kernel, targets, w_ce, w_z):
    ce, log_z = fn(h, kernel, targets)
    return jnp.sum(ce * w_ce) + jnp.sum(log_z * w_z)  # both outputs feed the loss (the z-loss reads log_z)


@pytest.mark.parametrize("length,chunk", [(24, 8), (23, 8), (5, 16)])  # exact chunks, a padded tail, one chunk
def test_losses_and_gradients_match_the_plain_log_softmax(length, chunk):
    k = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(k[0], (3, length, 16))
    kernel = jax.random.normal(k[1], (16, 50))
    targets = jax.random.randint(k[2], (3, length), 0, 50)
    w_ce, w_z = jax.random.uniform(k[3], (3, length)), jax.random.uniform(k[4], (3, length))
    fused = lambda h, w, t: head_cross_entropy(h, w, t, chunk)  # noqa: E731
    for got, want in zip(fused(h, kernel, targets), plain(h, kernel, targets)):
        assert got.shape == (3, length) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = [jax.grad(weighted, argnums=(1, 2))(fn, h, kernel, targets, w_ce, w_z) for fn in (fused, plain)]
    for got, want in zip(*grads):
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_give_bfloat16_gradients_close_to_float32():
    k = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k[0], (2, 32, 16))
    kernel = jax.random.normal(k[1], (16, 40)) * 0.3
    targets = jax.random.randint(k[2], (2, 32), 0, 40)
    loss = lambda h: jnp.sum(head_cross_entropy(h, kernel, targets, 8)[0])  # noqa: E731
    g16, g32 = jax.grad(loss)(h.astype(jnp.bfloat16)), jax.grad(loss)(h)
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(g16.astype(jnp.float32), g32, atol=0.05)


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk"):
        head_cross_entropy(jnp.zeros((1, 4, 2)), jnp.zeros((2, 3)), jnp.zeros((1, 4), jnp.int32), 0)
    with pytest.raises(ValueError, match="loss_chunk"):
        TrainConfig(loss_chunk=-1)


@pytest.mark.parametrize("tied", [False, True])
def test_train_loss_and_gradients_are_the_same_fused_or_not(tied):
    """The whole loss (cross-entropy, z-loss and the MTP loss) and every parameter's gradient."""
    cfg = config.preset("tiny-v3", num_hidden_layers=2, first_dense_layers=0, num_nextn_predict_layers=1,
                        vocab_size=96, tie_word_embeddings=tied)
    params = model.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    mask = jnp.ones((2, 20)).at[1, 15:].set(0)  # a padded row: the MTP mask must follow it
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": mask,
             "positions": jnp.broadcast_to(jnp.arange(20), (2, 20)), "segment_ids": jnp.zeros((2, 20), jnp.int32)}
    base = TrainConfig(z_loss_weight=1e-3, mtp_loss_weight=0.3)
    results = []
    for chunk in (0, 8):
        train = dataclasses.replace(base, loss_chunk=chunk)
        fn = jax.value_and_grad(lambda p: step.losses(cfg, train, p, batch, jnp.sum(mask)), has_aux=True)
        (loss, (metrics, _)), grads = jax.jit(fn)(params)
        results.append((loss, metrics, grads))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert float(m_a["mtp_sum"]) > 0 and float(m_a["z_sum"]) > 0
    for key in ("ce_sum", "z_sum", "mtp_sum", "mtp_tokens"):
        np.testing.assert_allclose(m_b[key], m_a[key], rtol=1e-5)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for (path, a), b in zip(jax.tree.leaves_with_path(g_a, is_leaf=lambda v: isinstance(v, nnx.Variable)),
                            jax.tree.leaves(g_b, is_leaf=lambda v: isinstance(v, nnx.Variable))):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
