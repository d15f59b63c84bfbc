"""Model configuration: one frozen dataclass, the layer-pattern grammar and the presets registry.

Field names follow the paper / Hugging Face configs (`hidden_size`, `kv_lora_rank`, `n_routed_experts`, ...) so a
config.json maps onto it field by field. A model is a layer pattern plus sizes:

    pattern   := item*
    item      := LETTER | "[" pattern "]" "*" COUNT
    LETTER    := one of AttentionKind (M full MLA, S sliding-window MLA, W window, C CSA, H HCA)

`"[MSSS]*8"` is a 1:3 full-to-sliding stack of 32 layers. The MLP kind of each layer comes from
`first_dense_layers`: the first k layers use a dense SwiGLU MLP, the rest MoE (dense everywhere when there are no
routed experts).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any


class AttentionKind(enum.StrEnum):
    FULL = "M"  # multi-head latent attention over the whole causal prefix
    SLIDING = "S"  # the same MLA, restricted to the last `sliding_window` tokens
    WINDOW = "W"  # V4 shared-KV attention over the window only
    CSA = "C"  # V4 window + the indexer's top-k of the ratio-4 overlapping compressed entries
    HCA = "H"  # V4 window + every visible ratio-128 compressed entry

    @property
    def is_v4(self) -> bool:
        return self in (AttentionKind.WINDOW, AttentionKind.CSA, AttentionKind.HCA)


class MlpKind(enum.StrEnum):
    DENSE = "dense"
    MOE = "moe"  # learned top-k routing
    HASH = "hash"  # experts chosen by a frozen token-id -> experts table (V4's first layers)


class ScoringFunc(enum.StrEnum):
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    SQRTSOFTPLUS = "sqrtsoftplus"  # sqrt(softplus(x)), DeepSeek-V4


class AttentionImpl(enum.StrEnum):
    FAST = "fast"  # blockwise (flash-style) for full layers, banded for windowed ones
    REFERENCE = "reference"  # the dense masked softmax: the numerics reference tests compare against


class MoeImpl(enum.StrEnum):
    AUTO = "auto"  # by backend, mesh and token count (moe/dispatch.py `resolve_impl`)
    DENSE = "dense"  # every expert on every token: the numerics reference
    EINSUM = "einsum"  # capacity-padded [E, C, d] buffers and one batched einsum
    RAGGED = "ragged"  # sort by expert + jax.lax.ragged_dot (dropless)
    EP_A2A = "ep_a2a"  # expert parallel: fixed-capacity all_to_all over `expert` (any backend)
    EP_RAGGED = "ep_ragged"  # expert parallel: ragged_all_to_all (dropless; TPU/GPU, emulated elsewhere)
    EP_PSUM = "ep_psum"  # expert parallel decode: replicated tokens, local experts, psum over `expert`


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    attention: AttentionKind
    mlp: MlpKind

    @property
    def letter(self) -> str:
        return self.attention.value


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension, as in DeepSeek-V3's `rope_scaling` (type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # cos/sin scale; None derives it from mscale (V4 fixes it at 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "custom"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    pattern: str = ""  # empty: "M" for every layer
    # attention (MLA for M/S; q LoRA and rope dims shared with V4)
    num_attention_heads: int
    q_lora_rank: int | None = None  # None: a direct query projection (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int
    v_head_dim: int = 0
    sliding_window: int = 128  # tokens an `S` query (and every V4 window branch) sees, itself included
    rope_theta: float = 10_000.0  # M, S and V4 window-only layers
    rope_scaling: RopeScaling | None = None  # YaRN for M/S layers, and for V4 compressed (C/H) layers
    # V4 attention (W, C, H): shared-KV MQA over `head_dim`-wide entries, RoPE on their last qk_rope_head_dim dims
    head_dim: int = 0
    o_groups: int = 1  # grouped low-rank output projection: heads split into o_groups groups ...
    o_lora_rank: int = 0  # ... each projected to o_lora_rank before the final mix
    compress_rope_theta: float = 160_000.0  # RoPE base of C/H layers
    csa_compress_ratio: int = 4
    hca_compress_ratio: int = 128
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # mHC residual streams (1 = the plain residual)
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # MLP / MoE
    intermediate_size: int = 0  # dense-MLP width (first_dense_layers)
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    scoring_func: ScoringFunc = ScoringFunc.SIGMOID
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_dense_layers: int = 0
    first_hash_layers: int = 0  # MoE layers (after the dense ones) routed by a frozen token-id table
    swiglu_limit: float | None = None  # V4 clamps SwiGLU pre-activations of every MoE expert to this
    moe_impl: MoeImpl = MoeImpl.AUTO
    capacity_factor: float | None = None  # None: exact (C = tokens); a number: C = ceil(cf * tokens * k / E)
    expert_tensor_parallel: bool = False  # split each routed expert's width over `tensor` (logical axis `mlp`)
    # multi-token prediction (V3 MTP modules after the main stack)
    num_nextn_predict_layers: int = 0
    # the rest
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters are kept in param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # recompute in the backward pass: "none", "block" (each block), "dots" (all but matmuls)
    attention_impl: AttentionImpl = AttentionImpl.FAST
    attention_block_size: int = 512  # query/key block of the blockwise attention kernels

    def __post_init__(self):
        if not self.pattern:
            object.__setattr__(self, "pattern", AttentionKind.FULL.value * self.num_hidden_layers)
        for field, enum_type in _ENUM_FIELDS.items():
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, enum_type(value))
            except ValueError:
                _fail(field, f"{value!r} is not one of {[e.value for e in enum_type]}")
        _validate(self)

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The explicit per-layer pattern: attention kind and MLP kind of every layer."""
        return tuple(
            LayerSpec(kind, self.mlp_kind(i)) for i, kind in enumerate(expand_pattern(self.pattern))
        )

    def mlp_kind(self, layer: int) -> MlpKind:
        """MLP of layer `layer` (`num_hidden_layers` is the MTP block: never hash-routed)."""
        if not self.is_moe or layer < self.first_dense_layers:
            return MlpKind.DENSE
        if layer < self.first_dense_layers + self.first_hash_layers and layer < self.num_hidden_layers:
            return MlpKind.HASH
        return MlpKind.MOE

    @property
    def mtp_attention(self) -> AttentionKind:
        """The MTP block attends with a window in V4 models (as released), with full MLA otherwise."""
        return AttentionKind.WINDOW if any(k.is_v4 for k in expand_pattern(self.pattern)) else AttentionKind.FULL

    def compress_ratio(self, kind: AttentionKind) -> int:
        return {AttentionKind.CSA: self.csa_compress_ratio, AttentionKind.HCA: self.hca_compress_ratio}.get(kind, 0)

    @property
    def explicit_pattern(self) -> str:
        return "".join(spec.letter for spec in self.layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """One paragraph a person can read: the explicit pattern, the full-to-sparse ratio and the sizes."""
        letters = self.explicit_pattern
        counts = {k.value: letters.count(k.value) for k in AttentionKind if k.value in letters}
        n_full = counts.get(AttentionKind.FULL.value, 0)
        ratio = f"{len(letters) - n_full}:{n_full} sparse:full"
        attention = (f"head_dim {self.head_dim}, window {self.sliding_window}, CSA/HCA ratios "
                     f"{self.csa_compress_ratio}/{self.hca_compress_ratio}, top-{self.index_topk}, mHC {self.hc_mult}"
                     if any(AttentionKind(k).is_v4 for k in counts) else
                     f"kv_lora {self.kv_lora_rank}, window {self.sliding_window}")
        return (
            f"{self.name}: {self.num_hidden_layers} layers {letters} ({ratio}; {counts}), "
            f"hidden {self.hidden_size}, {self.num_attention_heads} heads, {attention}, "
            f"experts {self.n_routed_experts} (top-{self.num_experts_per_tok}, shared {self.n_shared_experts}, "
            f"hash layers {self.first_hash_layers}), MTP {self.num_nextn_predict_layers}"
        )


_ENUM_FIELDS = {"scoring_func": ScoringFunc, "moe_impl": MoeImpl, "attention_impl": AttentionImpl}

# ---------------------------------------------------------------------------------------------------------------
# pattern grammar


_TOKEN = re.compile(r"\s*(?:(\[)|(\])\s*\*\s*(\d+)|([A-Za-z]))")


def expand_pattern(pattern: str) -> tuple[AttentionKind, ...]:
    """`"M[SSM]*2S"` -> (M, S, S, M, S, S, M, S). Raises ValueError naming `pattern` on bad syntax or letters."""
    stack: list[list[AttentionKind]] = [[]]
    pos = 0
    pattern = pattern.strip()
    while pos < len(pattern):
        match = _TOKEN.match(pattern, pos)
        if not match:
            _fail("pattern", f"cannot parse {pattern!r} at position {pos}: expected a letter, '[' or ']*N'")
        open_bracket, close_bracket, count, letter = match.groups()
        if open_bracket:
            stack.append([])
        elif close_bracket:
            if len(stack) == 1:
                _fail("pattern", f"unmatched ']' in {pattern!r}")
            body = stack.pop()
            if int(count) < 1 or not body:
                _fail("pattern", f"a repeat in {pattern!r} must be non-empty with count >= 1")
            stack[-1].extend(body * int(count))
        else:
            try:
                stack[-1].append(AttentionKind(letter))
            except ValueError:
                known = ", ".join(f"{k.value} ({k.name.lower()})" for k in AttentionKind)
                _fail("pattern", f"unknown layer letter {letter!r} in {pattern!r}; known: {known}")
        pos = match.end()
    if len(stack) != 1:
        _fail("pattern", f"unclosed '[' in {pattern!r}")
    return tuple(stack[0])


# ---------------------------------------------------------------------------------------------------------------
# validation


def _fail(field: str, why: str):
    raise ValueError(f"ModelConfig.{field}: {why}")


def _validate(cfg: ModelConfig) -> None:
    kinds = expand_pattern(cfg.pattern)
    if len(kinds) != cfg.num_hidden_layers:
        _fail("pattern", f"{cfg.pattern!r} expands to {len(kinds)} layers but num_hidden_layers is "
                         f"{cfg.num_hidden_layers}")
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "qk_rope_head_dim",
                "attention_block_size")
    for field in positive:
        if getattr(cfg, field) < 1:
            _fail(field, f"must be >= 1, got {getattr(cfg, field)}")
    if any(kind in (AttentionKind.FULL, AttentionKind.SLIDING) for kind in kinds):
        for field in ("kv_lora_rank", "v_head_dim"):
            if getattr(cfg, field) < 1:
                _fail(field, f"MLA layers (M/S) need {field} >= 1, got {getattr(cfg, field)}")
    if cfg.qk_nope_head_dim < 0:
        _fail("qk_nope_head_dim", f"must be >= 0, got {cfg.qk_nope_head_dim}")
    if any(cfg.mlp_kind(i) is MlpKind.DENSE for i in range(cfg.num_hidden_layers)) and cfg.intermediate_size < 1:
        _fail("intermediate_size", f"dense MLP layers need intermediate_size >= 1, got {cfg.intermediate_size}")
    if cfg.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"rotary pairs need an even size, got {cfg.qk_rope_head_dim}")
    if cfg.q_lora_rank is not None and cfg.q_lora_rank < 1:
        _fail("q_lora_rank", f"must be None or >= 1, got {cfg.q_lora_rank}")
    if cfg.sliding_window < 1:
        _fail("sliding_window", f"must be >= 1 token, got {cfg.sliding_window}")
    if cfg.num_nextn_predict_layers not in (0, 1):
        _fail("num_nextn_predict_layers", f"only depth 0 or 1 is supported, got {cfg.num_nextn_predict_layers}")
    if not 0 <= cfg.first_dense_layers <= cfg.num_hidden_layers:
        _fail("first_dense_layers", f"must be in [0, {cfg.num_hidden_layers}], got {cfg.first_dense_layers}")
    if cfg.is_moe:
        _validate_moe(cfg)
    if any(kind.is_v4 for kind in kinds):
        _validate_v4_attention(cfg, set(kinds))
    if cfg.hc_mult < 1:
        _fail("hc_mult", f"must be >= 1 (1 = plain residual), got {cfg.hc_mult}")
    if cfg.hc_mult > 1 and cfg.hc_sinkhorn_iters < 1:
        _fail("hc_sinkhorn_iters", f"must be >= 1, got {cfg.hc_sinkhorn_iters}")
    if cfg.first_hash_layers < 0 or (cfg.first_hash_layers and not cfg.is_moe):
        _fail("first_hash_layers", f"needs routed experts and must be >= 0, got {cfg.first_hash_layers}")
    if cfg.swiglu_limit is not None and cfg.swiglu_limit <= 0:
        _fail("swiglu_limit", f"must be None or > 0, got {cfg.swiglu_limit}")
    if cfg.capacity_factor is not None and cfg.capacity_factor <= 0:
        _fail("capacity_factor", f"must be None (exact) or > 0, got {cfg.capacity_factor}")
    if cfg.remat not in ("none", "block", "dots"):
        _fail("remat", f"must be none, block or dots, got {cfg.remat!r}")
    for field in ("dtype", "param_dtype"):
        if getattr(cfg, field) not in ("float32", "bfloat16", "float16"):
            _fail(field, f"must be float32, bfloat16 or float16, got {getattr(cfg, field)!r}")
    if cfg.rope_scaling is not None:
        if cfg.rope_scaling.factor < 1:
            _fail("rope_scaling", f"YaRN factor must be >= 1, got {cfg.rope_scaling.factor}")
        if cfg.rope_scaling.original_max_position_embeddings < 1:
            _fail("rope_scaling", "original_max_position_embeddings must be >= 1")


def _validate_v4_attention(cfg: ModelConfig, kinds: set[AttentionKind]) -> None:
    if cfg.head_dim < 1:
        _fail("head_dim", f"V4 layers (W/C/H) need head_dim >= 1, got {cfg.head_dim}")
    if not 0 < cfg.qk_rope_head_dim <= cfg.head_dim:
        _fail("qk_rope_head_dim", f"must be in [1, head_dim={cfg.head_dim}] for V4 layers")
    if not cfg.q_lora_rank:
        _fail("q_lora_rank", "V4 layers need a query LoRA rank")
    if cfg.o_groups < 1 or cfg.num_attention_heads % cfg.o_groups:
        _fail("o_groups", f"must divide num_attention_heads={cfg.num_attention_heads}, got {cfg.o_groups}")
    if cfg.o_lora_rank < 1:
        _fail("o_lora_rank", f"V4 layers need o_lora_rank >= 1, got {cfg.o_lora_rank}")
    for kind, field in ((AttentionKind.CSA, "csa_compress_ratio"), (AttentionKind.HCA, "hca_compress_ratio")):
        if kind in kinds and getattr(cfg, field) < 1:
            _fail(field, f"must be >= 1, got {getattr(cfg, field)}")
    if AttentionKind.CSA in kinds:
        for field in ("index_n_heads", "index_head_dim", "index_topk"):
            if getattr(cfg, field) < 1:
                _fail(field, f"CSA layers need {field} >= 1, got {getattr(cfg, field)}")
        if cfg.index_head_dim < cfg.qk_rope_head_dim:
            _fail("index_head_dim", f"must hold the {cfg.qk_rope_head_dim} rope dims, got {cfg.index_head_dim}")


def _validate_moe(cfg: ModelConfig) -> None:
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if cfg.moe_intermediate_size < 1:
        _fail("moe_intermediate_size", f"must be >= 1 with routed experts, got {cfg.moe_intermediate_size}")
    if not 1 <= k <= e:
        _fail("num_experts_per_tok", f"top-k must be in [1, n_routed_experts={e}], got {k}")
    if cfg.n_group < 1 or e % cfg.n_group:
        _fail("n_group", f"must divide n_routed_experts={e}, got {cfg.n_group}")
    if not 1 <= cfg.topk_group <= cfg.n_group:
        _fail("topk_group", f"must be in [1, n_group={cfg.n_group}], got {cfg.topk_group}")
    if k > cfg.topk_group * (e // cfg.n_group):
        _fail("num_experts_per_tok", f"top-{k} exceeds the {cfg.topk_group} x {e // cfg.n_group} experts "
                                     f"the selected groups hold")
    if cfg.n_group > 1 and e // cfg.n_group < 2:
        _fail("n_group", "group scores sum each group's top-2 experts, so groups need >= 2 experts")
    if cfg.n_shared_experts < 0:
        _fail("n_shared_experts", f"must be >= 0, got {cfg.n_shared_experts}")


# ---------------------------------------------------------------------------------------------------------------
# presets


def _tiny_v3(**overrides) -> ModelConfig:
    fields = dict(
        name="tiny-v3", vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_dense_layers=1,
        num_nextn_predict_layers=1, max_position_embeddings=1024, attention_block_size=64,
    )
    return ModelConfig(**(fields | overrides))


def _tiny_hybrid(**overrides) -> ModelConfig:
    fields = dict(name="tiny-hybrid", pattern="M[SSSM]*2", num_hidden_layers=9, sliding_window=16)
    return _tiny_v3(**(fields | overrides))


def _deepseek_v3_671b(**overrides) -> ModelConfig:
    fields = dict(
        name="deepseek-v3-671b", vocab_size=129_280, hidden_size=7168, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        first_dense_layers=3, num_nextn_predict_layers=1, rope_theta=10_000.0, max_position_embeddings=163_840,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
        dtype="bfloat16",
    )
    return ModelConfig(**(fields | overrides))


def _tiny_v4(**overrides) -> ModelConfig:
    """Every V4 path in seconds: W, C and H layers, hash + top-k routing, 4 mHC streams, MTP. The window (8) and
    both compression ratios (4, 16) are small so 48-token test sequences cross each of them at least twice."""
    fields = dict(
        name="tiny-v4", vocab_size=512, hidden_size=64, num_hidden_layers=7, pattern="WW[CH]*2C",
        num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        sliding_window=8, csa_compress_ratio=4, hca_compress_ratio=16, index_n_heads=2, index_head_dim=16,
        index_topk=3, compress_rope_theta=160_000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, attention_factor=1.0),
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, first_hash_layers=3, swiglu_limit=10.0,
        hc_mult=4, hc_sinkhorn_iters=20, num_nextn_predict_layers=1, max_position_embeddings=1024,
        attention_block_size=16,
    )
    return ModelConfig(**(fields | overrides))


_V4_YARN = RopeScaling(factor=16.0, original_max_position_embeddings=65_536, beta_fast=32.0, beta_slow=1.0,
                       mscale=0.0, mscale_all_dim=0.0, attention_factor=1.0)


def _deepseek_v4_flash(**overrides) -> ModelConfig:
    fields = dict(
        name="deepseek-v4-flash", vocab_size=129_280, hidden_size=4096, num_hidden_layers=43,
        pattern="WW[CH]*20C", num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
        o_groups=8, o_lora_rank=1024, sliding_window=128, csa_compress_ratio=4, hca_compress_ratio=128,
        index_n_heads=64, index_head_dim=128, index_topk=512, rope_theta=10_000.0, compress_rope_theta=160_000.0,
        rope_scaling=_V4_YARN, max_position_embeddings=1_048_576, moe_intermediate_size=2048,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5, first_hash_layers=3, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20,
        num_nextn_predict_layers=1, dtype="bfloat16",
    )
    return ModelConfig(**(fields | overrides))


def _deepseek_v4_pro(**overrides) -> ModelConfig:
    fields = dict(
        name="deepseek-v4-pro", hidden_size=7168, num_hidden_layers=61, pattern="HH[CH]*29C",
        num_attention_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024, n_routed_experts=384,
        moe_intermediate_size=3072, routed_scaling_factor=2.5,
    )
    return _deepseek_v4_flash(**(fields | overrides))


PRESETS = {
    "tiny-v3": _tiny_v3,
    "tiny-hybrid": _tiny_hybrid,
    "tiny-v4": _tiny_v4,
    "deepseek-v3-671b": _deepseek_v3_671b,
    "deepseek-v4-flash": _deepseek_v4_flash,
    "deepseek-v4-pro": _deepseek_v4_pro,
}

# Short names accepted by `preset(...)` for the fields people type most.
ALIASES = {"window": "sliding_window", "layers": "num_hidden_layers"}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config with fields overridden: `preset("tiny-hybrid", pattern="[MSSS]*2", window=16)`.

    Overriding `pattern` alone re-derives `num_hidden_layers` from it, so a ratio sweep only names patterns.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    overrides = {ALIASES.get(k, k): v for k, v in overrides.items()}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"ModelConfig.{key}: no such field (aliases: {ALIASES})")
    if "pattern" in overrides and "num_hidden_layers" not in overrides:
        overrides["num_hidden_layers"] = len(expand_pattern(overrides["pattern"]))
    if isinstance(overrides.get("rope_scaling"), dict):
        overrides["rope_scaling"] = RopeScaling(**overrides["rope_scaling"])
    return PRESETS[name](**overrides)


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """Slots per expert for `tokens` routed tokens: all of them when exact, else ceil(cf * tokens * k / E)."""
    if cfg.capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(cfg.capacity_factor * tokens * cfg.num_experts_per_tok
                                        / cfg.n_routed_experts)))
