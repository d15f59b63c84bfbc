"""DeepSeek-V4-Pro serving on a v5p slice: bf16 weights, experts over `expert`, heads over `tensor`, 128K contexts."""

from v4jax.aot import PodPlan, Serving, Step
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    return RunConfig(preset("deepseek-v4-pro", param_dtype="bfloat16"), TrainConfig(compute_dtype="bfloat16"))


def pod() -> PodPlan:
    return PodPlan(topology="v5p:8x8x4", mesh={"expert": 128, "tensor": 2}, steps=(Step.PREFILL, Step.DECODE),
                   serving=Serving(batch=8, max_len=131072, prefill_len=256))
