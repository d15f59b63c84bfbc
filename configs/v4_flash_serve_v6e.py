"""DeepSeek-V4-Flash serving on a v6e slice: bf16 weights, experts over `expert`, 32K-token contexts."""

from v4jax.aot import PodPlan, Serving, Step
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("deepseek-v4-flash", param_dtype="bfloat16"), TrainConfig(compute_dtype="bfloat16"))


def pod() -> PodPlan:
    return PodPlan(topology="v6e:8x8", mesh={"expert": 64}, steps=(Step.PREFILL, Step.DECODE),
                   serving=Serving(batch=8, max_len=32768, prefill_len=256))
