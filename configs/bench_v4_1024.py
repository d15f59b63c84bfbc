"""The performance suite's hidden-size-1024 V4 train workload (`python -m train.bench all`; alone:
`python -m train.bench train --config bench_v4_1024`): DeepSeek-V4's architecture at hidden 1024, sized so that a
train step takes a few seconds on 2 CPU cores.

4 layers `WCHC` (V4-Flash's `WW[CH]*20C` shrunk: a window-only layer, a CSA/HCA pair, a closing CSA) with V4-Flash's
attention ratios: window 128, compression ratios 4 / 128, query LoRA hidden / 4 (256); 16 heads of head_dim 128 (RoPE
on the last 64 dims, one shared K=V head), output LoRA 4 groups x 256; indexer 8 heads x 64, top-64 (half of the 128
CSA entries at 512 tokens). MoE in every layer, the first hash-routed (V4-Flash: 3 of 43): 16 routed experts of
width 512 (hidden / 2, as V4-Flash), top-2, one shared expert, sqrtsoftplus scores, routed scaling 1.5, SwiGLU clamp
10; mHC with 4 streams and 20 Sinkhorn iterations. Vocabulary 8,192 (the byte tokens of the stdlib corpus use 256 of
it; 8K keeps the head at a fifth of the forward FLOPs), untied, no YaRN, no MTP block (cost.py's model FLOPs leave
it out, so the step does not run it).

What the choices owe to `configs/bench_cpu.py` (MFU 40% at hidden 512): layers unrolled (`scan_layers=False`), MoE
on the einsum back end with capacity factor 1.25 (the padding is computed, not counted as model FLOPs), AdamW,
float32. Unlike there, `attention_impl="fast"`: every V4 layer is windowed, and the dense reference kernel computes
all 512 x 512 scores of a 128-token window (about 4x the work, plus mask and softmax passes over [b, heads, 512,
512]), while the banded kernel computes the band: in an interleaved A/B (`profiling.compare`) on a shared
machine the step took 0.68x the reference kernel's time.
Attention blocks of 64 queries (a 64-query block reads 64 + 128 band keys where a 128-query block reads 128 + 128):
0.96x the step time of 128 in an interleaved A/B (`python -m train.bench compare`, 6 steps each). The head and the
cross-entropy are not fused (`loss_chunk=0`): at an 8K vocabulary the [b, t, vocab] logits are 67 MB, and the fused
path's backward recomputes them (a third more head FLOPs); unfused took 0.95x the step time, interleaved (5 steps).
Batch 4 x 512 (2,048 tokens, 525 GFLOP of model FLOPs per step): on a shared 2-core machine the step ran at about
1.5x the FLOP rate of batch 2 x 512 (not interleaved; likely the per-step costs, the optimizer's among them, spread
over twice the tokens, and the experts' capacity buffers growing from 160 to 320 rows).
"""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig

PATTERN = "WCHC"


def model(**overrides):
    """The bench_v4_1024 ModelConfig (fields overridable)."""
    fields = dict(
        vocab_size=8192, hidden_size=1024, num_hidden_layers=4, pattern=PATTERN,
        num_attention_heads=16, head_dim=128, qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=256,
        sliding_window=128, csa_compress_ratio=4, hca_compress_ratio=128, index_n_heads=8, index_head_dim=64,
        index_topk=64, rope_theta=10_000.0, compress_rope_theta=160_000.0, rope_scaling=None,
        max_position_embeddings=4096, moe_intermediate_size=512, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, first_hash_layers=1,
        swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, num_nextn_predict_layers=0, tie_word_embeddings=False,
        capacity_factor=1.25, moe_impl="einsum", attention_impl="fast", attention_block_size=64, scan_layers=False,
        dtype="float32", param_dtype="float32",
    )
    return preset("tiny-v4", **(fields | overrides)).replace(name="bench-v4-1024")


def config() -> RunConfig:
    return RunConfig(model(), TrainConfig(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1, steps=20,
                                          batch_size=4, seq_len=512, warmup_steps=2, log_every=1,
                                          checkpoint_every=0, compute_dtype="float32", loss_chunk=0))
