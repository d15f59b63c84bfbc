"""tiny-hybrid (full MLA every fourth layer, sliding-window MLA between) on the embedded stdlib corpus."""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("tiny-hybrid"), TrainConfig(steps=150, batch_size=8, seq_len=64, log_every=10))
