"""Every logical axis name, declared once.

Parameters and activations name their dimensions with these; `rules.py` maps them onto mesh axes. A name that is
not here is a typo, and `rules.logical_to_spec` rejects it.
"""

import enum


class Axis(enum.StrEnum):
    # activations
    BATCH = "batch"
    SEQ = "seq"
    CAPACITY = "capacity"  # slots per expert in the MoE dispatch buffers
    CACHE_SEQ = "cache_seq"  # the position axis of serving-cache arrays that grow with max_len
    # shared by parameters and activations
    EMBED = "embed"
    VOCAB = "vocab"
    HEADS = "heads"
    HEAD_DIM = "head_dim"
    Q_LORA = "q_lora"
    KV_LORA = "kv_lora"
    MLP = "mlp"
    EXPERTS = "experts"
    EXPERT_MLP = "expert_mlp"
    # parameters only
    LAYERS = "layers"  # the stacked axis of a scanned unit
    STREAMS = "streams"  # mHC residual streams (V4)


ALL = frozenset(Axis)
