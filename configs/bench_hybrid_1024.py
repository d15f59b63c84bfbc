"""The performance suite's hidden-size-1024 seed-hybrid train workload (`python -m train.bench all`; alone:
`python -m train.bench train --config bench_hybrid_1024`): the hybrid the project started from (the `tiny-hybrid`
preset: full MLA `M` layers with sliding-window MLA `S` layers between, on DeepSeek-V3's MoE) at hidden 1024, sized
so that a train step takes a few seconds on 2 CPU cores.

5 layers `MSSSM` (tiny-hybrid's `M[SSSM]*2` with one repeat: 1 full to 3 sliding, starting and ending full), window
128 (a quarter of the 512-token sequence, as tiny-hybrid's 16 of its 64). tiny-hybrid's widths scaled with the
hidden size (there 64): 8 heads (per-head widths V3's: q/k nope 128 + rope 64, values 128), query and KV latents
hidden / 2 (512); the first layer a dense SwiGLU of width 2 x hidden (2048), the rest MoE with 8 routed experts of
width hidden / 2 (512), top-2 of 4 groups (2 groups chosen), one shared expert, routed scaling 2.5. Vocabulary 8,192
(byte tokens use 256 of it), untied, no MTP block (cost.py's model FLOPs leave it out, so the step does not run it).

What the choices owe to `configs/bench_cpu.py` (MFU 40% at hidden 512): layers unrolled (`scan_layers=False`), MoE
on the einsum back end with capacity factor 1.25, AdamW, float32, `attention_impl="reference"` (at 512 tokens the
dense masked softmax is one big matmul per head with nothing recomputed in the backward pass; the S layers pay for
all 512 keys where 128 are visible, and in an interleaved A/B on a shared machine the banded kernel was no faster:
0.99x).
Batch 4 x 512 (2,048 tokens, 685 GFLOP of model FLOPs per step), as bench_v4_1024.
"""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig

PATTERN = "MSSSM"


def model(**overrides):
    """The bench_hybrid_1024 ModelConfig (fields overridable)."""
    fields = dict(
        vocab_size=8192, hidden_size=1024, num_hidden_layers=5, pattern=PATTERN, sliding_window=128,
        num_attention_heads=8, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_dense_layers=1, num_nextn_predict_layers=0, max_position_embeddings=4096, tie_word_embeddings=False,
        capacity_factor=1.25, moe_impl="einsum", attention_impl="reference", attention_block_size=128,
        scan_layers=False, dtype="float32", param_dtype="float32",
    )
    return preset("tiny-hybrid", **(fields | overrides)).replace(name="bench-hybrid-1024")


def config() -> RunConfig:
    return RunConfig(model(), TrainConfig(optimizer="adamw", learning_rate=1e-4, weight_decay=0.1, steps=20,
                                          batch_size=4, seq_len=512, warmup_steps=2, log_every=1,
                                          checkpoint_every=0, compute_dtype="float32"))
