"""v4jax: DeepSeek-V3/V4-style language models in JAX + Flax NNX (used functionally).

    cfg = v4jax.config.preset("tiny-hybrid", pattern="[MSSS]*2", window=16)
    mesh = v4jax.sharding.make_mesh(data=2, expert=2, tensor=2)
    params = v4jax.model.init(cfg, jax.random.key(0), mesh=mesh)
    with jax.set_mesh(mesh):
        logits = v4jax.model.forward(cfg, params, tokens)
"""

from v4jax import config, cost, hf, model, serving, sharding
from v4jax.config import ModelConfig, preset

__all__ = ["ModelConfig", "config", "cost", "hf", "model", "preset", "serving", "sharding"]
__version__ = "0.1.0"
