"""The performance suite's workload (`python -m train.bench all`): MaxText's `deepseek4-tiny` model shapes, the
config the peers were measured on (`../shared/peers/hf_bench.py`, `TINY_V4`: MaxText's deepseek4-tiny.yml mapped onto
transformers' `DeepseekV4Config`), mapped here field by field onto a v4jax `ModelConfig`.

43 layers in the V4-Flash pattern `WW[CH]*20C` (hf_bench's `compress_ratios` [0, 0] + [4, 128] * 20 + [4]: two
window-only layers, then 20 CSA/HCA pairs, then one CSA), compression ratios 4 / 128; hidden 64, vocab 129,280;
4 heads of head_dim 32 with RoPE on all 32 dims (`qk_rope_head_dim=32`), one shared KV head (V4's MQA), query LoRA
16, output LoRA 4 groups x 16, window 32; indexer 4 heads x 32, top-16; 16 routed experts of width 64, top-4, one
shared expert, sqrtsoftplus scores, no top-k renormalisation, routed scaling 1.0, SwiGLU clamp 10, the first 3 MoE
layers hash-routed; mHC with 4 streams and 20 Sinkhorn iterations; RoPE bases 10,000 / 160,000 (compressed layers),
no YaRN, max positions 4096, RMSNorm eps 1e-6, untied embeddings. No MTP block (transformers drops it and the
peers ran none). float32 throughout, AdamW, 4 x 512 tokens per step (the peers' batch): the stdlib corpus' byte
tokens (ids < 256 of the 129,280-entry vocabulary; the cost of a step does not depend on the ids).

Kernel settings (not model shapes): attention blocks of 64 queries. With a 32-token window a 64-query block reads
64 + 64 band keys where a 128-query block reads 128 + 128, half of them out of reach; 64 measured 16% faster per
train step than 128 (and 512, one block per sequence, 1.8x slower) in one A/B run on 2 cores. The fused head +
cross-entropy takes 32 positions at a time (4 x 32 = 128 rows of 129,280 logits, 66 MB, per chunk): 4% faster than
128 positions, whose 265 MB chunks no longer stay in cache.
"""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig

PATTERN = "WW[CH]*20C"


def model(**overrides):
    """The bench_tiny_v4 ModelConfig (fields overridable, e.g. a shorter `pattern` for a quick run)."""
    fields = dict(
        vocab_size=129_280, hidden_size=64, num_hidden_layers=43, pattern=PATTERN,
        num_attention_heads=4, head_dim=32, qk_rope_head_dim=32, q_lora_rank=16, o_groups=4, o_lora_rank=16,
        sliding_window=32, csa_compress_ratio=4, hca_compress_ratio=128, index_n_heads=4, index_head_dim=32,
        index_topk=16, rope_theta=10_000.0, compress_rope_theta=160_000.0, rope_scaling=None,
        max_position_embeddings=4096, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, scoring_func="sqrtsoftplus", norm_topk_prob=False, routed_scaling_factor=1.0,
        first_hash_layers=3, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
        num_nextn_predict_layers=0, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
        param_dtype="float32", attention_block_size=64,
    )
    return preset("tiny-v4", **(fields | overrides)).replace(name="bench-tiny-v4")


def config() -> RunConfig:
    return RunConfig(model(), TrainConfig(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1, steps=20,
                                          batch_size=4, seq_len=512, warmup_steps=2, log_every=1,
                                          checkpoint_every=0, compute_dtype="float32", loss_chunk=32))
