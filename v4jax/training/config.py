"""The run configuration: everything about a training run that is not the model's shape.

A run is `RunConfig(model=ModelConfig, train=TrainConfig)`; `configs/<name>.py` modules return one, and
`--set key=value` overrides any field by dotted name (`train.learning_rate=3e-4`, `model.sliding_window=64`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from v4jax.config import ModelConfig


class OptimizerKind(enum.StrEnum):
    ADAMW = "adamw"
    MUON = "muon"  # the V4 recipe: Muon for 2-D hidden matrices, AdamW for the rest


class RematPolicy(enum.StrEnum):
    NONE = "none"  # keep every activation
    BLOCK = "block"  # recompute each block in the backward pass (save only block inputs)
    DOTS = "dots"  # save matmul outputs, recompute the elementwise rest


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # optimisation
    optimizer: OptimizerKind = OptimizerKind.MUON
    learning_rate: float = 3e-3
    min_learning_rate_ratio: float = 0.1  # cosine decays to this fraction of the peak
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    grad_clip_norm: float = 1.0
    grad_accumulation: int = 1  # micro-batches per optimizer step
    # losses
    mtp_loss_weight: float = 0.3
    z_loss_weight: float = 0.0
    # the head and the cross-entropy fused, this many positions at a time: no [b, t, vocab] logits are kept
    # (v4jax.layers.cross_entropy); 0 materialises the logits and takes a plain log-softmax
    loss_chunk: int = 128
    balance_loss_weight: float = 0.0  # sequence-wise auxiliary balance loss (V3/V4 use a tiny value)
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias += rate * sign(mean load - load)
    # compute
    compute_dtype: str = "float32"  # model compute dtype; parameters stay float32 (master weights)
    remat: RematPolicy = RematPolicy.NONE
    # run
    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step (all micro-batches together)
    seq_len: int = 128
    seed: int = 0
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    # data
    data: str = "stdlib"  # "stdlib" (the embedded corpus), a prepared token directory, or "synthetic:<task>"
    tokenizer: str = "bytes"  # "bytes" or a path to a local HF tokenizer.json

    def __post_init__(self):
        for field, enum_type in (("optimizer", OptimizerKind), ("remat", RematPolicy)):
            try:
                object.__setattr__(self, field, enum_type(getattr(self, field)))
            except ValueError:
                raise ValueError(f"TrainConfig.{field}: {getattr(self, field)!r} is not one of "
                                 f"{[e.value for e in enum_type]}") from None
        positive = ("learning_rate", "steps", "batch_size", "seq_len", "grad_accumulation", "log_every")
        for field in positive:
            if getattr(self, field) <= 0:
                raise ValueError(f"TrainConfig.{field}: must be > 0, got {getattr(self, field)}")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(f"TrainConfig.grad_accumulation: must divide batch_size={self.batch_size}, "
                             f"got {self.grad_accumulation}")
        if self.loss_chunk < 0:
            raise ValueError(f"TrainConfig.loss_chunk: must be >= 0 (0: unfused), got {self.loss_chunk}")
        if self.warmup_steps < 0:  # longer than the run is allowed: the learning rate never reaches its peak
            raise ValueError(f"TrainConfig.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.compute_dtype: float32 or bfloat16, got {self.compute_dtype!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": _plain(dataclasses.asdict(self.model)), "train": _plain(dataclasses.asdict(self.train))}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value
