"""`model_type: deepseek_v4` checkpoints: config mapping, tensor naming and rules (used by `v4jax.hf`).

Tensors are matched under DeepSeek's release naming without the `model.` prefix (`layers.3.attn.wq_a.weight`,
`layers.3.ffn.experts.7.w1.weight`, `hc_head_fn`), which is also what `save_pretrained` writes below `model.`.
Checkpoints in transformers' in-memory naming (`self_attn.q_a_proj`, `mlp.experts.gate_up_proj`, `attn_hc.fn`)
are renamed to it first (`canonical_name`). The MTP block (`mtp.*`) is not read: transformers drops it too.
"""

from __future__ import annotations

import re

from v4jax.config import AttentionKind, LayerSpec, MlpKind, ModelConfig, RopeScaling
from v4jax.hf import Rule, _keep, _heads_in, fused_experts

LAYER_TYPES = {"sliding_attention": AttentionKind.WINDOW, "compressed_sparse_attention": AttentionKind.CSA,
               "heavily_compressed_attention": AttentionKind.HCA}

# transformers' in-memory names -> DeepSeek's names, applied in order (the indexer's before the generic ones).
_RENAMES = [(re.compile(a), b) for a, b in [
    (r"^embed_tokens\.weight$", "embed.weight"), (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"), (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"), (r"\.kv_norm\.", ".norm."), (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."), (r"\.q_a_norm\.", ".q_norm."), (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.kv_proj\.", ".wkv."), (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."), (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."), (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]]

# DeepSeek's names (no prefix) -> the names `save_pretrained` writes, which `from_pretrained` reads back.
_SAVED_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight",
              "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
              "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def canonical_name(name: str) -> str:
    name = name.removeprefix("model.")
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def saved_name(canonical: str) -> str:
    return _SAVED_TOP.get(canonical, "model." + canonical)


def layer_prefix(layer: int) -> str:
    return f"layers.{layer}."


# ---------------------------------------------------------------------------------------------------------------
# config


def _pattern(hf: dict, n: int, rates: dict[str, int]) -> str:
    """Layer kinds from `layer_types`, or from the legacy per-layer `compress_ratios` (0 = window only)."""
    by_ratio = {0: "sliding_attention", **{ratio: kind for kind, ratio in rates.items()}}
    types = hf.get("layer_types") or [by_ratio.get(r, f"ratio {r}") for r in (hf.get("compress_ratios") or [])]
    if len(types) < n:
        raise ValueError(f"config.json lists {len(types)} layer types for {n} layers")
    unknown = sorted({t for t in types[:n] if t not in LAYER_TYPES})
    if unknown:
        raise ValueError(f"unknown DeepSeek-V4 layer types {unknown}; known: {sorted(LAYER_TYPES)}")
    return "".join(LAYER_TYPES[t].value for t in types[:n])


def _hash_layers(hf: dict, n: int) -> int:
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        return min(n, hf.get("num_hash_layers", 3))
    count = next((i for i, kind in enumerate(kinds) if kind != "hash_moe"), len(kinds))
    if "hash_moe" in kinds[count:]:
        raise ValueError("hash-routed layers must come first (mlp_layer_types has hash_moe after a moe layer)")
    return count


def _rope(hf: dict) -> tuple[float, float, RopeScaling | None]:
    params = hf.get("rope_parameters") or {}
    main = params.get("main", {})
    compress = params.get("compress", params)
    scaling = None
    if compress.get("rope_type", compress.get("type", "default")) == "yarn":
        scaling = RopeScaling(
            factor=float(compress["factor"]),
            original_max_position_embeddings=int(compress["original_max_position_embeddings"]),
            beta_fast=float(compress.get("beta_fast") or 32), beta_slow=float(compress.get("beta_slow") or 1),
            mscale=float(compress.get("mscale") or 0), mscale_all_dim=float(compress.get("mscale_all_dim") or 0),
            attention_factor=float(compress.get("attention_factor", 1.0)))
    return (float(main.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            float(compress.get("rope_theta", hf.get("compress_rope_theta", 160_000.0))), scaling)


def config_from_hf(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128,
             **(hf.get("compress_rates") or {})}
    rates["compressed_sparse_attention"] = hf.get("compress_rate_csa", rates["compressed_sparse_attention"])
    rates["heavily_compressed_attention"] = hf.get("compress_rate_hca", rates["heavily_compressed_attention"])
    rope_dim = hf.get("qk_rope_head_dim") or int(hf["head_dim"] * hf.get("partial_rotary_factor", 64 / 512))
    rope_theta, compress_theta, scaling = _rope(hf)
    return ModelConfig(
        name=hf.get("_name_or_path") or "hf-deepseek-v4", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_hidden_layers=n, pattern=_pattern(hf, n, rates), num_attention_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"], qk_rope_head_dim=rope_dim, q_lora_rank=hf["q_lora_rank"],
        o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"], sliding_window=hf["sliding_window"],
        csa_compress_ratio=rates["compressed_sparse_attention"],
        hca_compress_ratio=rates["heavily_compressed_attention"], index_n_heads=hf["index_n_heads"],
        index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"], rope_theta=rope_theta,
        compress_rope_theta=compress_theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 1_048_576),
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts", 1),
        num_experts_per_tok=hf["num_experts_per_tok"], scoring_func=hf.get("scoring_func", "sqrtsoftplus"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.5)),
        first_hash_layers=_hash_layers(hf, n), swiglu_limit=hf.get("swiglu_limit") or None,
        hc_mult=hf.get("hc_mult", 4), hc_sinkhorn_iters=hf.get("hc_sinkhorn_iters", 20),
        hc_eps=hf.get("hc_eps", 1e-6), num_nextn_predict_layers=0, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    kinds = {kind.value: name for name, kind in LAYER_TYPES.items()}
    if not all(spec.attention.is_v4 for spec in cfg.layers):
        raise ValueError(f"hf.save writes deepseek_v4 checkpoints, whose layers are W, C or H; {cfg.name} has "
                         f"pattern {cfg.explicit_pattern}")
    rope = {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "compress": {"rope_type": "default", "rope_theta": cfg.compress_rope_theta}}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope["compress"] = {"rope_type": "yarn", "rope_theta": cfg.compress_rope_theta, "factor": s.factor,
                            "original_max_position_embeddings": s.original_max_position_embeddings,
                            "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                            "attention_factor": 1.0 if s.attention_factor is None else s.attention_factor}
    for part in rope.values():
        part["partial_rotary_factor"] = cfg.qk_rope_head_dim / cfg.head_dim
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.head_dim, "q_lora_rank": cfg.q_lora_rank,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "sliding_window": cfg.sliding_window,
        "layer_types": [kinds[letter] for letter in cfg.explicit_pattern],
        "compress_rates": {"compressed_sparse_attention": cfg.csa_compress_ratio,
                           "heavily_compressed_attention": cfg.hca_compress_ratio},
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "scoring_func": cfg.scoring_func.value,
        "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
        "mlp_layer_types": ["hash_moe" if spec.mlp is MlpKind.HASH else "moe" for spec in cfg.layers],
        "swiglu_limit": cfg.swiglu_limit or 0.0, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps, "num_nextn_predict_layers": 0, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
        "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------------------------
# tensor rules (DeepSeek's names, relative to `layers.{i}.` for layers)


def _grouped_out(n_groups: int, heads: int):
    """wo_a [g*r, (n/g)*c] <-> ours [g, n/g, c, r] (block-diagonal: group j maps its heads to its r outputs)."""
    per_group = heads // n_groups
    return (lambda a: a.reshape(n_groups, a.shape[0] // n_groups, per_group, -1).transpose(0, 2, 3, 1),
            lambda a: a.transpose(0, 3, 1, 2).reshape(a.shape[0] * a.shape[3], -1))


def _group_mix(n_groups: int):
    """wo_b [d, g*r] <-> ours [g, r, d]."""
    return (lambda a: a.T.reshape(n_groups, -1, a.shape[0]), lambda a: a.reshape(-1, a.shape[-1]).T)


def _compressor_rules(src: str, dst: tuple) -> list[Rule]:
    return [Rule((*dst, "wkv"), f"{src}wkv.weight"), Rule((*dst, "wgate"), f"{src}wgate.weight"),
            Rule((*dst, "position_bias"), f"{src}ape", _keep, _keep),
            Rule((*dst, "norm", "weight"), f"{src}norm.weight", _keep, _keep)]


def _hyper_rules(site: str, ours: str) -> list[Rule]:
    return [Rule((ours, "fn"), f"hc_{site}_fn"), Rule((ours, "base"), f"hc_{site}_base", _keep, _keep),
            Rule((ours, "scale"), f"hc_{site}_scale", _keep, _keep)]


def layer_rules(cfg: ModelConfig, spec: LayerSpec) -> list[Rule]:
    n = cfg.num_attention_heads
    rules = [
        Rule(("attn_norm", "weight"), "attn_norm.weight", _keep, _keep),
        Rule(("mlp_norm", "weight"), "ffn_norm.weight", _keep, _keep),
        *_hyper_rules("attn", "attn_hc"), *_hyper_rules("ffn", "mlp_hc"),
        Rule(("attn", "wq_a"), "attn.wq_a.weight"),
        Rule(("attn", "q_norm", "weight"), "attn.q_norm.weight", _keep, _keep),
        Rule(("attn", "wq_b"), "attn.wq_b.weight", *_heads_in(n)),
        Rule(("attn", "wkv"), "attn.wkv.weight"),
        Rule(("attn", "kv_norm", "weight"), "attn.norm.weight", _keep, _keep),
        Rule(("attn", "wo_a"), "attn.wo_a.weight", *_grouped_out(cfg.o_groups, n)),
        Rule(("attn", "wo_b"), "attn.wo_b.weight", *_group_mix(cfg.o_groups)),
        Rule(("attn", "sinks"), "attn.attn_sink", _keep, _keep),
    ]
    if spec.attention in (AttentionKind.CSA, AttentionKind.HCA):
        rules += _compressor_rules("attn.compressor.", ("attn", "compressor"))
    if spec.attention is AttentionKind.CSA:
        rules += _compressor_rules("attn.indexer.compressor.", ("attn", "indexer", "compressor"))
        rules += [Rule(("attn", "indexer", "wq_b"), "attn.indexer.wq_b.weight", *_heads_in(cfg.index_n_heads)),
                  Rule(("attn", "indexer", "weights_proj"), "attn.indexer.weights_proj.weight")]
    rules.append(Rule(("mlp", "router", "weight"), "ffn.gate.weight"))
    if spec.mlp is MlpKind.HASH:
        rules.append(Rule(("mlp", "router", "tid2eid"), "ffn.gate.tid2eid", _keep, _keep))
    else:
        rules.append(Rule(("mlp", "router", "bias"), "ffn.gate.bias", _keep, _keep))
    fused = fused_experts("ffn.")
    rules += [Rule(("mlp", "experts", ours), f"ffn.experts.{{e}}.{theirs}.weight", per_expert=True, fused=fused[ours])
              for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
    if cfg.n_shared_experts:
        rules += [Rule(("mlp", "shared", ours), f"ffn.shared_experts.{theirs}.weight")
                  for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
    return rules


def top_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule(("embed", "embedding"), "embed.weight", _keep, _keep),
             Rule(("norm", "weight"), "norm.weight", _keep, _keep),
             Rule(("hc_head", "fn"), "hc_head_fn"), Rule(("hc_head", "base"), "hc_head_base", _keep, _keep),
             Rule(("hc_head", "scale"), "hc_head_scale", _keep, _keep)]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("head", "kernel"), "head.weight"))
    return rules
