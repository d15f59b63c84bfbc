"""DeepSeek-V4-Flash serving with a 1M-token context on a v5p slice: bf16 weights, experts over `expert`, the cache
and prefill split over `context`."""

from v4jax.aot import PodPlan, Serving, Step
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("deepseek-v4-flash", param_dtype="bfloat16"), TrainConfig(compute_dtype="bfloat16"))


def pod() -> PodPlan:
    return PodPlan(topology="v5p:4x4x4", mesh={"expert": 16, "context": 4}, steps=(Step.PREFILL, Step.DECODE),
                   serving=Serving(batch=8, max_len=1 << 20, prefill_len=8192))
