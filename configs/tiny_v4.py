"""tiny-v4 on the embedded stdlib corpus (byte tokens): every V4 path, minutes on a laptop."""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("tiny-v4"), TrainConfig(steps=100, batch_size=8, seq_len=64, learning_rate=3e-3,
                                                    warmup_steps=10, log_every=10, checkpoint_every=50))
