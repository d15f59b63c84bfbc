"""DeepSeek-V4-Pro (1.6T total, 49B active) pretraining on a v5p slice: 4K-token sequences, bf16 compute, Muon.

Fits on v5p:8x8x16 (1024 chips) at 88.5 of 95 GiB per device (README "Production plans"). Two choices make it fit:
- `capacity_factor=1.25`: the dropless ep_ragged exchange sizes every receive buffer for the worst case (all p
  expert shards sending their whole batch to one: 16 x 4096 x 6 rows of 7168, 5.25 GiB each), which was most of
  the 146 GB of temporaries XLA asked for on 512 chips; a capacity bounds them at 1.25x the mean, dropping the
  overflow (logged as `dropped_fraction`).
- expert=32: 12 local experts per device, so the per-layer gathered expert weights are half those of expert=16.
512 chips do not fit even with the capacity (106 GB of temporaries): the fsdp-gathered embedding and head
(1.7 GiB per copy, several copies) and the float32 logits stay whole on every device.
"""

from v4jax.aot import PodPlan, Step
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("deepseek-v4-pro", capacity_factor=1.25),
                     TrainConfig(steps=100_000, batch_size=1024, seq_len=4096, learning_rate=2.2e-4,
                                 warmup_steps=2000, compute_dtype="bfloat16", remat="block", log_every=10,
                                 checkpoint_every=500))


def pod() -> PodPlan:
    return PodPlan(topology="v5p:8x8x16", mesh={"fsdp": 32, "expert": 32}, steps=(Step.TRAIN,))
