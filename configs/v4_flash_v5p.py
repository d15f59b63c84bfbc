"""DeepSeek-V4-Flash (284B total, 13B active) pretraining on a v5p slice: 4K-token sequences, bf16 compute, Muon."""

from v4jax.aot import PodPlan, Step
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("deepseek-v4-flash"),
                     TrainConfig(steps=100_000, batch_size=256, seq_len=4096, learning_rate=2.2e-4, warmup_steps=2000,
                                 compute_dtype="bfloat16", remat="block", log_every=10, checkpoint_every=500))


def pod() -> PodPlan:
    return PodPlan(topology="v5p:8x8x4", mesh={"fsdp": 32, "expert": 8}, steps=(Step.TRAIN,))
