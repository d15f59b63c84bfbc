"""DeepSeek routers: expert scores in float32, then either a learned top-k choice or a frozen token-id table.

Legend: n tokens, d model, e experts, g groups, k top-k, v vocab.
`Router` (V3, and V4's later layers): sigmoid, softmax or sqrt-softplus scores; bias-corrected, optionally
group-limited top-k. `e_score_correction_bias` steers *which* experts are chosen (aux-loss-free balancing) but
never the weights they get; it is a `RouterBias` variable, not a Param, so optimizers never see it.
`HashRouter` (V4's first `first_hash_layers` MoE layers): the experts of a token are `tid2eid[token_id]`, a frozen
`HashTable`; the learned gate only weights them. It has no bias: nothing about its choice is learned.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig, ScoringFunc
from v4jax.layers.linear import param
from v4jax.sharding import Axis


class RouterBias(nnx.Variable):
    """Non-trainable routing state (updated outside the gradient by the training step)."""


class HashTable(nnx.Variable):
    """Frozen token-id -> expert-ids table, int32 [v, k]: never trained, never updated; loaded from checkpoints."""


@dataclasses.dataclass(frozen=True)
class RoundRobinTable:
    """`init_fn` of a fresh HashTable: token t -> experts (t * k + j) % e for j < k, distinct when k <= e, and every
    expert gets the same number of (token, slot) pairs up to one. Any leading (stacked `layers`) dims repeat the table.

    A frozen dataclass, not a closure: variable metadata is part of the state's pytree structure, so it must
    compare by value for two builds of one config to have the same structure.
    """

    n_experts: int

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
        del key  # deterministic
        *lead, vocab, k = shape
        table = (jnp.arange(vocab, dtype=jnp.int32)[:, None] * k + jnp.arange(k, dtype=jnp.int32)) % self.n_experts
        return jnp.broadcast_to(table, shape).astype(dtype)


def score(logits: jax.Array, func: ScoringFunc) -> jax.Array:
    """Per-expert affinities from float32 router logits [n, e]."""
    if func is ScoringFunc.SIGMOID:
        return jax.nn.sigmoid(logits)
    if func is ScoringFunc.SOFTMAX:
        return jax.nn.softmax(logits, -1)
    if func is ScoringFunc.SQRTSOFTPLUS:
        return jnp.sqrt(jax.nn.softplus(logits))
    raise ValueError(f"unknown scoring function {func!r}")


def _gate_weight(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Variable:
    # Every token scores every expert, so the router weight is not split over `experts`.
    return param(rngs, (cfg.hidden_size, cfg.n_routed_experts), (Axis.EMBED, None), std=cfg.initializer_range)


def _scores(cfg: ModelConfig, weight: nnx.Variable, x: jax.Array) -> jax.Array:
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), weight[...].astype(jnp.float32))
    return score(logits, cfg.scoring_func)


def _weights(cfg: ModelConfig, scores: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The chosen experts' (unbiased) scores, normalised and scaled; indices as int32."""
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices.astype(jnp.int32)


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = _gate_weight(cfg, rngs)
        self.bias = param(rngs, (cfg.n_routed_experts,), (None,), std=0, kind=RouterBias)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [n, d] -> weights float32 [n, k], expert indices int32 [n, k]."""
        cfg = self.cfg
        scores = _scores(cfg, self.weight, x)
        choice = scores + self.bias[...].astype(jnp.float32)
        if cfg.n_group > 1:
            choice = limit_to_top_groups(choice, cfg.n_group, cfg.topk_group)
        _, indices = jax.lax.top_k(choice, cfg.num_experts_per_tok)
        return _weights(cfg, scores, indices)


class HashRouter(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = _gate_weight(cfg, rngs)
        init = RoundRobinTable(cfg.n_routed_experts)
        shape = (cfg.vocab_size, cfg.num_experts_per_tok)
        # init_std=0 keeps it out of `fill_random`'s normal draw; `init_fn` gives it a valid table instead of zeros.
        self.tid2eid = HashTable(init(None, shape, jnp.int32), logical_axes=(None, None), init_std=0, init_fn=init)

    def __call__(self, x: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [n, d], token_ids int [n] -> weights float32 [n, k], expert indices int32 [n, k]."""
        scores = _scores(self.cfg, self.weight, x)
        indices = jnp.take(self.tid2eid[...], token_ids.reshape(-1), axis=0, mode="clip")
        return _weights(self.cfg, scores, indices)


def limit_to_top_groups(choice: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """Keep the experts of the `topk_group` groups whose two best experts score highest; -inf elsewhere."""
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [n, g]
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.any(top_groups[:, :, None] == jnp.arange(n_group), axis=1)  # [n, g]; a compare, not a scatter
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
