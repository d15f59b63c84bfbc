"""DeepSeek router: sigmoid (or softmax) scores in float32, bias-corrected group-limited top-k selection.

Legend: n tokens, d model, e experts, g groups, k top-k.
`e_score_correction_bias` steers *which* experts are chosen (aux-loss-free balancing) but never the weights they
get; it is a `RouterBias` variable, not a Param, so optimizers never see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig, ScoringFunc
from v4jax.layers.linear import param
from v4jax.sharding import Axis


class RouterBias(nnx.Variable):
    """Non-trainable routing state (updated outside the gradient by the training step)."""


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Every token scores every expert, so the router weight is not split over `experts`.
        self.weight = param(rngs, (cfg.hidden_size, cfg.n_routed_experts), (Axis.EMBED, None),
                            std=cfg.initializer_range)
        self.bias = param(rngs, (cfg.n_routed_experts,), (None,), std=0, kind=RouterBias)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [n, d] -> weights float32 [n, k], expert indices int32 [n, k]."""
        cfg = self.cfg
        logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        scores = jax.nn.sigmoid(logits) if cfg.scoring_func is ScoringFunc.SIGMOID else jax.nn.softmax(logits, -1)
        choice = scores + self.bias[...].astype(jnp.float32)
        if cfg.n_group > 1:
            choice = limit_to_top_groups(choice, cfg.n_group, cfg.topk_group)
        _, indices = jax.lax.top_k(choice, cfg.num_experts_per_tok)
        weights = jnp.take_along_axis(scores, indices, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices.astype(jnp.int32)


def limit_to_top_groups(choice: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """Keep the experts of the `topk_group` groups whose two best experts score highest; -inf elsewhere."""
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [n, g]
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
