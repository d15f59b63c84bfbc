"""Analytic cost model: parameters, KV-cache bytes and forward FLOPs per token, per layer kind and summed.

Legend: T context tokens, n tokens a query sees (itself included), d model, V vocab, E routed experts, k top-k,
f expert width, r MLA latent rank, p rope dims, c V4 entry width (head_dim), m compression ratio, W window.
Every figure is a closed form of the config (no arrays): parameter counts equal `model.param_counts` exactly;
FLOPs count 2 per multiply-add in matmuls only (softmax, norms, rope, Sinkhorn and compressor pooling ignored).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from v4jax.config import AttentionKind, LayerSpec, MlpKind, ModelConfig, MoeImpl, capacity, preset

_MLA = (AttentionKind.FULL, AttentionKind.SLIDING)
_WINDOWED = (AttentionKind.SLIDING, AttentionKind.WINDOW, AttentionKind.CSA, AttentionKind.HCA)


# ---------------------------------------------------------------------------------------------------------------
# parameters


class Part(enum.StrEnum):
    """Parameter groups outside the per-layer attention and MLP (those are keyed by their kind)."""

    EMBED = "embed"
    HEAD = "head"
    NORMS = "norms"  # per-layer attn/mlp norms and the final norm
    MHC = "mhc"  # per-layer hyper-connections and the final hyper-head (hc_mult > 1 only)
    MTP = "mtp"


@dataclasses.dataclass(frozen=True)
class Count:
    total: int = 0
    active: int = 0  # what one token multiplies by: routed experts count k/E, the embedding lookup nothing

    def __add__(self, other: Count) -> Count:
        return Count(self.total + other.total, self.active + other.active)


def attention_params(cfg: ModelConfig, kind: AttentionKind) -> int:
    """One attention module (with its compressor and indexer), norms and sinks included."""
    if kind in _MLA:
        return _mla_params(cfg)
    d, n, c, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    core = d * ql + ql + ql * n * c + d * c + c + n * c * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * d + n
    return core + _compressor_params(cfg, kind) + (_indexer_params(cfg) if kind is AttentionKind.CSA else 0)


def _mla_params(cfg: ModelConfig) -> int:
    d, n, h, r, p = (cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.kv_lora_rank,
                     cfg.qk_rope_head_dim)
    q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n * h if cfg.q_lora_rank else d * n * h
    return q + d * (r + p) + r + r * n * (cfg.qk_nope_head_dim + cfg.v_head_dim) + n * cfg.v_head_dim * d


def _compressor_params(cfg: ModelConfig, kind: AttentionKind) -> int:
    """kv and gate projections, per-slot position bias, norm. CSA's overlapping blocks double the width."""
    if kind not in (AttentionKind.CSA, AttentionKind.HCA):
        return 0
    width = (2 if kind is AttentionKind.CSA else 1) * cfg.head_dim
    return 2 * cfg.hidden_size * width + cfg.compress_ratio(kind) * width + cfg.head_dim


def _indexer_params(cfg: ModelConfig) -> int:
    """The lightning indexer: its own CSA-style compressor at index_head_dim, query up-projection, head weights."""
    d, hi, ci = cfg.hidden_size, cfg.index_n_heads, cfg.index_head_dim
    compressor = 2 * d * 2 * ci + cfg.csa_compress_ratio * 2 * ci + ci
    return compressor + cfg.q_lora_rank * hi * ci + d * hi


def mlp_params(cfg: ModelConfig, mlp: MlpKind) -> Count:
    """Dense SwiGLU, or router + routed experts (k of E active) + shared experts. Router bias / hash table are
    buffers, not parameters."""
    d = cfg.hidden_size
    if mlp is MlpKind.DENSE:
        return Count(3 * d * cfg.intermediate_size, 3 * d * cfg.intermediate_size)
    expert = 3 * d * cfg.moe_intermediate_size
    always = d * cfg.n_routed_experts + expert * cfg.n_shared_experts
    return Count(always + expert * cfg.n_routed_experts, always + expert * cfg.num_experts_per_tok)


def mhc_params(cfg: ModelConfig) -> int:
    """Two hyper-connections per layer: fn [(2+hc)*hc, hc*d], base [(2+hc)*hc], scale [3]. None at hc_mult 1."""
    hc = cfg.hc_mult
    return 0 if hc == 1 else 2 * ((2 + hc) * hc * (hc * cfg.hidden_size + 1) + 3)


def _hyper_head_params(cfg: ModelConfig) -> int:
    hc = cfg.hc_mult
    return 0 if hc == 1 else hc * hc * cfg.hidden_size + hc + 1


def mtp_spec(cfg: ModelConfig) -> LayerSpec:
    """The MTP block's layer: window-only in V4 models (compress ratio 0), full MLA otherwise."""
    return LayerSpec(cfg.mtp_attention, cfg.mlp_kind(cfg.num_hidden_layers))


def layer_params(cfg: ModelConfig, spec: LayerSpec) -> Count:
    attn = attention_params(cfg, spec.attention) + 2 * cfg.hidden_size + mhc_params(cfg)
    return Count(attn, attn) + mlp_params(cfg, spec.mlp)


def mtp_params(cfg: ModelConfig) -> Count:
    """Embedding and hidden norms, the [2d, d] projection, one block, its norm (and hyper-head); embedding and
    head are shared with the main model."""
    if not cfg.num_nextn_predict_layers:
        return Count()
    d = cfg.hidden_size
    extra = 3 * d + 2 * d * d + _hyper_head_params(cfg)
    return layer_params(cfg, mtp_spec(cfg)) + Count(extra, extra)


def param_breakdown(cfg: ModelConfig, include_mtp: bool = False) -> dict[AttentionKind | MlpKind | Part, Count]:
    """(total, active) per attention kind, per MLP kind and per `Part`; the values sum to `params`."""
    d, vocab = cfg.hidden_size, cfg.vocab_size
    embed_active = vocab * d if cfg.tie_word_embeddings else 0
    head = 0 if cfg.tie_word_embeddings else d * vocab
    parts: dict[AttentionKind | MlpKind | Part, Count] = {
        Part.EMBED: Count(vocab * d, embed_active), Part.HEAD: Count(head, head)}
    for spec in cfg.layers:
        attn = attention_params(cfg, spec.attention)
        parts[spec.attention] = parts.get(spec.attention, Count()) + Count(attn, attn)
        parts[spec.mlp] = parts.get(spec.mlp, Count()) + mlp_params(cfg, spec.mlp)
    norms = (2 * cfg.num_hidden_layers + 1) * d
    mhc = cfg.num_hidden_layers * mhc_params(cfg) + _hyper_head_params(cfg)
    parts[Part.NORMS], parts[Part.MHC] = Count(norms, norms), Count(mhc, mhc)
    if include_mtp:
        parts[Part.MTP] = mtp_params(cfg)
    return parts


def params(cfg: ModelConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active) parameters, as `model.param_counts` defines them (MTP excluded by default)."""
    count = sum(param_breakdown(cfg, include_mtp).values(), Count())
    return count.total, count.active


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@dataclasses.dataclass(frozen=True)
class KvFormat:
    """How one cache entry is stored. An entry is `nope` plain values (the MLA latent r, or the V4 entry's first
    c - p dims) plus p rope values; indexer keys are index_head_dim values. Scales are per block of plain values.
    Main entries (not indexer keys) are padded to a multiple of `entry_align` bytes."""

    name: str
    value_bytes: float = 2.0  # per plain value
    rope_bytes: float = 2.0  # per rope value
    scale_block: int = 0  # plain values per scale; 0 = no scales
    scale_bytes: float = 0.0
    index_bytes: float = 2.0  # per indexer-key value
    index_scale_block: int = 0
    index_scale_bytes: float = 0.0
    entry_align: int = 1

    def entry(self, nope: int, rope: int) -> int:
        scales = math.ceil(nope / self.scale_block) * self.scale_bytes if self.scale_block else 0
        raw = math.ceil(nope * self.value_bytes + scales + rope * self.rope_bytes)
        return -(-raw // self.entry_align) * self.entry_align

    def index_entry(self, dim: int) -> int:
        scales = math.ceil(dim / self.index_scale_block) * self.index_scale_bytes if self.index_scale_block else 0
        return math.ceil(dim * self.index_bytes + scales)


# Everything bf16 (the default; the reference code's own storage). V3: (512 + 64) x 2 = 1152 B per token per layer.
BF16 = KvFormat("bf16")
# DeepSeek-V3.2 FlashMLA: 512 FP8 + 4 fp32 scales + 64 bf16 = 656 B; DSA indexer key 128 FP8 + 1 fp32 = 132 B.
V32_FP8 = KvFormat("v3.2-fp8", value_bytes=1, scale_block=128, scale_bytes=4, index_bytes=1,
                   index_scale_block=128, index_scale_bytes=4)
# DeepSeek-V4 production (paper 3.6): 448 FP8 + 7 UE8M0 scales (1x64) + 64 bf16 = 583, padded to 584 B; indexer key
# 128 FP4 + 4 UE8M0 scales (1x32) = 68 B.
V4_FP8 = KvFormat("v4-fp8", value_bytes=1, scale_block=64, scale_bytes=1, index_bytes=0.5, index_scale_block=32,
                  index_scale_bytes=1, entry_align=8)


def plain_format(dtype) -> KvFormat:
    """Every value in one dtype, no scales: what `serving.cache` stores for a given compute dtype."""
    size = float(dtype.itemsize)
    return KvFormat(str(dtype), value_bytes=size, rope_bytes=size, index_bytes=size)


def entry_bytes(cfg: ModelConfig, kind: AttentionKind, fmt: KvFormat = BF16) -> int:
    """One cached token / compressed entry: MLA latent + rope key (M, S) or the shared K=V vector (W, C, H)."""
    p = cfg.qk_rope_head_dim
    return fmt.entry(cfg.kv_lora_rank if kind in _MLA else cfg.head_dim - p, p)


def cache_entries(cfg: ModelConfig, kind: AttentionKind, context: int) -> tuple[int, int]:
    """(main entries, indexer keys) one layer holds after `context` tokens: the window ring (min(T, W)) for
    windowed kinds, every token for M, plus floor(T / m) completed compressed entries for C / H."""
    window = min(context, cfg.sliding_window) if kind in _WINDOWED else context
    ratio = cfg.compress_ratio(kind)
    compressed = context // ratio if ratio else 0
    return window + compressed, compressed if kind is AttentionKind.CSA else 0


def state_bytes(cfg: ModelConfig, kind: AttentionKind, value_bytes: int = 4) -> int:
    """The compressors' pending-block state (kv and score, fp32 by default): [2m, 2c] (+ indexer [2m, 2 c_I]) for
    CSA, [m, c] for HCA. Constant per sequence; `kv_bytes` leaves it out unless asked."""
    m = cfg.compress_ratio(kind)
    if kind is AttentionKind.CSA:
        return 2 * value_bytes * 2 * m * 2 * (cfg.head_dim + cfg.index_head_dim)
    return 2 * value_bytes * m * cfg.head_dim if kind is AttentionKind.HCA else 0


def kv_bytes(cfg: ModelConfig, kind: AttentionKind, context: int, fmt: KvFormat = BF16,
             include_state: bool = False) -> int:
    """Cache bytes of one layer of `kind` for one sequence of `context` tokens (window entries in `fmt` too)."""
    main, index = cache_entries(cfg, kind, context)
    # A context shorter than one block never completes an entry, so it keeps no compressor state either.
    has_entries = bool(cfg.compress_ratio(kind)) and context >= cfg.compress_ratio(kind)
    state = state_bytes(cfg, kind) if include_state and has_entries else 0
    return main * entry_bytes(cfg, kind, fmt) + index * fmt.index_entry(cfg.index_head_dim) + state


def kv_bytes_per_token(cfg: ModelConfig, kind: AttentionKind, context: int, fmt: KvFormat = BF16) -> float:
    """`kv_bytes` / context: M's entry size; windowed kinds amortise their ring, C / H add entry / m."""
    return kv_bytes(cfg, kind, context, fmt) / context


def kv_cache_bytes(cfg: ModelConfig, context: int, fmt: KvFormat = BF16, batch: int = 1,
                   include_state: bool = False) -> int:
    """The main stack's whole cache (the MTP block is not cached) for `batch` sequences of `context` tokens."""
    return batch * sum(kv_bytes(cfg, spec.attention, context, fmt, include_state) for spec in cfg.layers)


def v32_config(**overrides) -> ModelConfig:
    """DeepSeek-V3.2 (DSA) as this model sees it: V3-671B's M stack plus a lightning indexer (64 heads x 128,
    top-2048) in every layer, read from the index_* fields. 1M tokens in `V32_FP8`: 61 x (656 + 132) = 48,068 B per
    token, 50.4 GB in all; V4-Pro in `V4_FP8` is 5.28 GB, about 10.5 % of it (the paper says about 10 %)."""
    fields = dict(name="deepseek-v3.2", index_n_heads=64, index_head_dim=128, index_topk=2048)
    return preset("deepseek-v3-671b").replace(**(fields | overrides))


def v32_kv_bytes(cfg: ModelConfig, context: int, fmt: KvFormat = V32_FP8, batch: int = 1) -> int:
    """`kv_cache_bytes` of a V3.2-style model: its cache plus one indexer key per token in every M layer."""
    full = sum(spec.attention is AttentionKind.FULL for spec in cfg.layers)
    return kv_cache_bytes(cfg, context, fmt, batch) + batch * full * context * fmt.index_entry(cfg.index_head_dim)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs per token


class Phase(enum.StrEnum):
    PREFILL = "prefill"  # a forward over T tokens, averaged per token: query t sees n = t + 1 tokens
    DECODE = "decode"  # one new token after T - 1 cached ones: n = T; MLA runs absorbed


def _keys(context: int, phase: Phase, cap: int | None = None, ratio: int = 1) -> float:
    """min(cap, floor(n / ratio)), averaged over n = 1..T (prefill) or at n = T (decode)."""
    cap = math.inf if cap is None else cap
    if phase is Phase.DECODE:
        return min(cap, context // ratio)
    return _sum_keys(context, ratio, cap) / context


def _sum_keys(t: int, ratio: int, cap: float) -> int:
    """sum_{n=1..t} min(cap, floor(n / ratio)), exactly."""
    if cap * ratio <= t:
        first = int(cap * ratio)
        return _sum_keys(first - 1, ratio, cap) + int(cap) * (t - first + 1)
    q = t // ratio
    return ratio * q * (q - 1) // 2 + q * (t - q * ratio + 1)


def attention_projection_flops(cfg: ModelConfig, kind: AttentionKind) -> int:
    """The context-independent matmuls: 2 x every projection weight (q, kv, output, compressor, indexer)."""
    return 2 * (attention_params(cfg, kind) - _attention_vectors(cfg, kind))


def _attention_vectors(cfg: ModelConfig, kind: AttentionKind) -> int:
    """The non-matmul parameters of an attention module: norms, sinks, position biases."""
    if kind in _MLA:
        return (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    m, c, ci = cfg.compress_ratio(kind), cfg.head_dim, cfg.index_head_dim
    vectors = cfg.q_lora_rank + c + cfg.num_attention_heads
    if kind is AttentionKind.CSA:
        return vectors + m * 2 * c + c + m * 2 * ci + ci
    return vectors + (m * c + c if kind is AttentionKind.HCA else 0)


def attention_keys(cfg: ModelConfig, kind: AttentionKind, context: int, phase: Phase = Phase.PREFILL):
    """(keys attended, entries the indexer scores) per query: all n (M), min(n, W) (S, W), window + the top-k of
    the floor(n / m) visible compressed entries (C, which scores all of them) or all of them (H)."""
    if kind is AttentionKind.FULL:
        return _keys(context, phase), 0.0
    window = _keys(context, phase, cap=cfg.sliding_window)
    m = cfg.compress_ratio(kind)
    if kind is AttentionKind.HCA:
        return window + _keys(context, phase, ratio=m), 0.0
    if kind is AttentionKind.CSA:
        return window + _keys(context, phase, cap=cfg.index_topk, ratio=m), _keys(context, phase, ratio=m)
    return window, 0.0


def attention_core_flops(cfg: ModelConfig, kind: AttentionKind, context: int, phase: Phase = Phase.PREFILL) -> float:
    """Scores + weighted values over the attended keys, plus the indexer's scan (2 x heads x dim per entry).
    MLA per key: 2n(qk + v) expanded (prefill), 2n(2r + p) absorbed (decode); V4 shared K=V: 4nc."""
    keys, scanned = attention_keys(cfg, kind, context, phase)
    n = cfg.num_attention_heads
    if kind in _MLA:
        per_key = (2 * n * (cfg.qk_head_dim + cfg.v_head_dim) if phase is Phase.PREFILL
                   else 2 * n * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    else:
        per_key = 4 * n * cfg.head_dim
    return keys * per_key + scanned * 2 * cfg.index_n_heads * cfg.index_head_dim


def attention_flops(cfg: ModelConfig, kind: AttentionKind, context: int, phase: Phase = Phase.PREFILL) -> float:
    """One layer's attention per token: projections + core."""
    return attention_projection_flops(cfg, kind) + attention_core_flops(cfg, kind, context, phase)


def mlp_flops(cfg: ModelConfig, mlp: MlpKind) -> int:
    """SwiGLU 6 d f per expert run (k routed + shared), plus the router's 2 d E (hash layers score too)."""
    d = cfg.hidden_size
    if mlp is MlpKind.DENSE:
        return 6 * d * cfg.intermediate_size
    runs = cfg.num_experts_per_tok + cfg.n_shared_experts
    return 6 * d * cfg.moe_intermediate_size * runs + 2 * d * cfg.n_routed_experts


def moe_exchange_bytes(cfg: ModelConfig, tokens_per_shard: int, expert_shards: int, impl: MoeImpl | str,
                       value_bytes: int = 2) -> float:
    """Bytes one MoE layer's forward moves off one device in expert-parallel dispatch (there and back), for
    `tokens_per_shard` tokens on each of `expert_shards` shards. ep_a2a: the fixed [p, E/p, C, d] buffer less the
    shard's own part, exactly what `dispatch` sends; ep_ragged: the assignments routed to other shards under a
    balanced router (the `a2a_bytes` metric reports the real count); ep_psum and one-device dispatch: none."""
    p, d, k = expert_shards, cfg.hidden_size, cfg.num_experts_per_tok
    impl = MoeImpl(impl)
    if impl is MoeImpl.EP_A2A:
        return 2 * (p - 1) * (cfg.n_routed_experts // p) * capacity(cfg, tokens_per_shard) * d * value_bytes
    if impl is MoeImpl.EP_RAGGED:
        return 2 * tokens_per_shard * k * (p - 1) / p * d * value_bytes
    return 0.0


SEGMENT_BYTES = 4  # int32 segment ids and positions travel with the tokens they label


def context_bytes(cfg: ModelConfig, kind: AttentionKind, seq: int, shards: int, batch: int = 1,
                  value_bytes: int = 2) -> int:
    """Bytes one attention layer's forward delivers to one device when a sequence of `seq` tokens is split over
    `shards` context shards (the busiest device: one with a left neighbour; `attention.context` moves exactly
    this). H = window - 1 halo tokens, t = seq / shards local tokens, m the compression ratio:

      S      halo of H latents + rope keys (r + p values) and their segments;
      W      halo of H K=V entries (c values) and their segments;
      M      all-gather of (shards - 1) x t latents + rope keys and segments, plus the zig-zag swap: half the
             shard's x, positions and segments out, half its output back (d values each way);
      C, H   the window halo, plus an all-gather of the (shards - 1) x t / m compressed entries and their segments,
             C also of the float32 indexer keys and the left neighbour's last block of x (m tokens of d values).

    The backward pass moves the same bytes the other way (each collective transposes into one of equal size)."""
    if shards == 1:
        return 0
    t, d, b = seq // shards, cfg.hidden_size, batch
    halo = b * (cfg.sliding_window - 1) if kind in _WINDOWED else 0
    if kind in _MLA:
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if kind is AttentionKind.SLIDING:
            return halo * (latent * value_bytes + SEGMENT_BYTES)
        swap = b * (t // 2) * (2 * d * value_bytes + 2 * SEGMENT_BYTES) if t % 2 == 0 else 0
        return (shards - 1) * b * t * (latent * value_bytes + SEGMENT_BYTES) + swap
    total = halo * (cfg.head_dim * value_bytes + SEGMENT_BYTES)
    ratio = cfg.compress_ratio(kind)
    if ratio:
        gathered = (shards - 1) * b * t // ratio
        total += gathered * (cfg.head_dim * value_bytes + SEGMENT_BYTES)
    if kind is AttentionKind.CSA:
        total += gathered * cfg.index_head_dim * 4 + b * ratio * (d * value_bytes + SEGMENT_BYTES)
    return total


def prefill_context_bytes(cfg: ModelConfig, kind: AttentionKind, seq: int, shards: int, max_len: int,
                          batch: int = 1, value_bytes: int = 2) -> int:
    """Bytes one attention layer delivers to one device in a prefill of `seq` tokens split over `shards` context
    shards into an empty cache of `max_len` (`attention.context.prefill`): the forward's `context_bytes`, plus
    the all-reduces (a ring: 2 (g - 1) / g of the buffer) that assemble the whole arrays of the cache from each
    shard's disjoint writes: the window ring [b, min(max_len, window), e] in the cache dtype and, for C and H,
    the compressors' float32 pending projections and gates [b, slots, parts x width] (C: the indexer's too). M's
    latents and the C/H entries are sliced from what the forward gathered: nothing more moves. A prompt is one
    document per row, so H's entry segments are constants that XLA does not gather (C's are not: the overlap of
    shard 0's first block is marked invalid)."""
    if shards == 1:
        return 0
    total = context_bytes(cfg, kind, seq, shards, batch, value_bytes)
    if kind is AttentionKind.HCA:
        total -= (shards - 1) * batch * (seq // shards) // cfg.hca_compress_ratio * SEGMENT_BYTES

    def all_reduce(nbytes: int) -> int:
        return 2 * nbytes * (shards - 1) // shards

    if kind in _WINDOWED:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim if kind in _MLA else cfg.head_dim
        total += all_reduce(batch * min(max_len, cfg.sliding_window) * width * value_bytes)
    ratio = cfg.compress_ratio(kind)
    if ratio and max_len >= ratio:
        csa = kind is AttentionKind.CSA
        slots, parts = (2 * ratio, 2) if csa else (ratio, 1)
        widths = [cfg.head_dim] + ([cfg.index_head_dim] if csa else [])
        total += sum(2 * all_reduce(batch * slots * parts * width * 4) for width in widths)  # kv and gate
    return total


def decode_context_bytes(cfg: ModelConfig, kind: AttentionKind, shards: int, batch: int = 1, chunk: int = 1,
                         value_bytes: int = 2, max_len: int | None = None) -> int:
    """Bytes one attention layer's `cached.extend` (a decode step, chunk = 1, or a prefill chunk) delivers to one
    device when the serving cache's positions are split over `shards` context shards (flash-decoding; counted as
    `context_bytes` and `hlo.received_bytes` count, an all-reduce as a ring: 2 (g - 1) / g of its buffer). The
    chunk is whole on every shard; with b rows, t = chunk tokens and n heads:

      S, W   nothing: the window ring is whole;
      M      all-reduces of the row max (pmax) and the softmax denominator (psum), float32 [b, n, t] each, and of
             the latent-space output [b, t, n, r];
      C, H   the same with the output [b, t, n, c]; C also all-gathers each shard's top-k candidates (float32
             index score and int32 entry index per query) from the others: (shards - 1) x b x t x k' x 8 bytes,
             k' = min(top-k, entries per shard) (per shard: max_len / m / shards; None: at least the top-k).

    Assumes the layer's split arrays divide evenly (else `serving.cache` keeps them whole and nothing moves)."""
    if shards == 1 or kind in (AttentionKind.SLIDING, AttentionKind.WINDOW):
        return 0
    b, t, n = batch, chunk, cfg.num_attention_heads
    width = cfg.kv_lora_rank if kind is AttentionKind.FULL else cfg.head_dim

    def all_reduce(nbytes: int) -> int:
        return 2 * nbytes * (shards - 1) // shards

    total = 2 * all_reduce(b * n * t * 4) + all_reduce(b * t * n * width * value_bytes)
    if kind is AttentionKind.CSA:
        local = cfg.index_topk if max_len is None else max_len // cfg.csa_compress_ratio // shards
        total += (shards - 1) * b * t * min(cfg.index_topk, local) * (4 + 4)  # float32 score, int32 index
    return total


def other_flops(cfg: ModelConfig) -> int:
    """The output head and, with hc_mult > 1, the mHC mixing: per site the fn projection and collapse / expand."""
    d, hc = cfg.hidden_size, cfg.hc_mult
    head = 2 * d * cfg.vocab_size
    if hc == 1:
        return head
    site = 2 * (2 + hc) * hc * hc * d + 2 * hc * d + 2 * hc * hc * d + hc * d
    return head + 2 * cfg.num_hidden_layers * site + 2 * hc * hc * d + 2 * hc * d


def flops_per_token(cfg: ModelConfig, context: int, phase: Phase = Phase.PREFILL) -> float:
    """The main stack's forward FLOPs per token (MTP excluded)."""
    layers = sum(attention_flops(cfg, s.attention, context, phase) + mlp_flops(cfg, s.mlp) for s in cfg.layers)
    return layers + other_flops(cfg)


def v32_attention_flops(cfg: ModelConfig, context: int, phase: Phase = Phase.DECODE) -> float:
    """One V3.2 (DSA) layer per token: MLA over min(n, top-k) keys + the indexer (q from the q latent, one key and
    head weights per token) scanning all n tokens."""
    hi, ci = cfg.index_n_heads, cfg.index_head_dim
    indexer = 2 * (cfg.q_lora_rank * hi * ci + cfg.hidden_size * (ci + hi))
    mla = attention_flops(cfg.replace(sliding_window=cfg.index_topk), AttentionKind.SLIDING, context, phase)
    return mla + indexer + _keys(context, phase) * 2 * hi * ci


# ---------------------------------------------------------------------------------------------------------------
# report


@dataclasses.dataclass(frozen=True)
class KindRow:
    kind: AttentionKind
    layers: int
    kv_bytes: int  # these layers' cache for one sequence of `context` tokens
    kv_bytes_per_token: float  # kv_bytes / context
    attention_flops: float  # per token, summed over these layers
    mlp_flops: float  # per token, the MLPs of these layers
    context_bytes: int = 0  # per layer of this kind: bytes one device receives with the sequence split (forward)


@dataclasses.dataclass(frozen=True)
class Report:
    name: str
    pattern: str
    context: int
    phase: Phase
    kv_format: KvFormat
    params_total: int
    params_active: int
    rows: tuple[KindRow, ...]
    other_flops: float  # head + mHC
    context_shards: int = 1

    @property
    def kv_bytes(self) -> int:
        return sum(row.kv_bytes for row in self.rows)

    @property
    def flops_per_token(self) -> float:
        return sum(row.attention_flops + row.mlp_flops for row in self.rows) + self.other_flops

    def table(self) -> str:
        """A Markdown table, one row per attention kind present plus a total, under a title line with params; with
        the sequence split over context shards, a column of the bytes each layer moves per device."""
        split = self.context_shards > 1
        rows = [_table_row(f"{r.kind.value} ({r.kind.name.lower()})", r.layers, r.kv_bytes_per_token, r.kv_bytes,
                           r.attention_flops, r.mlp_flops, r.context_bytes if split else None) for r in self.rows]
        total = _table_row("total", sum(r.layers for r in self.rows), self.kv_bytes / self.context, self.kv_bytes,
                           sum(r.attention_flops for r in self.rows), sum(r.mlp_flops for r in self.rows),
                           sum(r.layers * r.context_bytes for r in self.rows) if split else None)
        title = (f"{self.name} {self.pattern} at {self.context:,} tokens ({self.phase.value}, KV {self.kv_format.name})"
                 f": params {_si(self.params_total, '')} total, {_si(self.params_active, '')} active")
        if split:
            title += f"; sequence split over {self.context_shards} context shards"
        head = _TABLE_HEAD_SPLIT if split else _TABLE_HEAD
        tail = f"head + mHC {_si(self.other_flops, 'FLOP')}/token; forward {_si(self.flops_per_token, 'FLOP')}/token"
        return "\n".join([title, "", *head, *rows, total, "", tail])

    __str__ = table


def report(cfg: ModelConfig, context: int = 4096, phase: Phase = Phase.PREFILL, fmt: KvFormat = BF16,
           context_shards: int = 1) -> Report:
    """Per attention kind present: layer count, KV bytes (total and per token), attention and MLP FLOPs/token, and
    with `context_shards` > 1 the bytes one layer moves per device with the sequence split (`context_bytes`; bf16
    activations, whatever the cache format)."""
    rows = []
    for kind in AttentionKind:
        specs = [s for s in cfg.layers if s.attention is kind]
        if not specs:
            continue
        kv = len(specs) * kv_bytes(cfg, kind, context, fmt)
        attn = len(specs) * attention_flops(cfg, kind, context, phase)
        rows.append(KindRow(kind, len(specs), kv, kv / context, attn, sum(mlp_flops(cfg, s.mlp) for s in specs),
                            context_bytes(cfg, kind, context, context_shards)))
    total, active = params(cfg)
    return Report(cfg.name, cfg.pattern, context, phase, fmt, total, active, tuple(rows), other_flops(cfg),
                  context_shards)


_TABLE_HEAD = ("| kind | layers | KV bytes/token | KV bytes | attention FLOPs/token | MLP FLOPs/token |",
               "|---|---:|---:|---:|---:|---:|")
_TABLE_HEAD_SPLIT = (_TABLE_HEAD[0] + " context bytes/layer/device |", _TABLE_HEAD[1] + "---:|")


def _table_row(label: str, layers: int, kv_per_token: float, kv: float, attn: float, mlp: float,
               context: float | None = None) -> str:
    cells = (label, str(layers), _si(kv_per_token, "B"), _si(kv, "B"), _si(attn, "FLOP"), _si(mlp, "FLOP"))
    if context is not None:
        cells += (_si(context, "B"),)
    return "| " + " | ".join(cells) + " |"


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


if __name__ == "__main__":
    import sys

    _cfg, _context = preset(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    _shards = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    print(report(_cfg, _context, context_shards=_shards))
    if _shards > 1:  # serving with the cache split the same way: what one decode step moves (bf16, one row)
        _kinds = dict.fromkeys(s.attention for s in _cfg.layers)
        print("decode step, cache split over context: " + ", ".join(
            f"{k.value} {_si(decode_context_bytes(_cfg, k, _shards, max_len=_context), 'B')}" for k in _kinds)
            + " per layer, per device, one row")
