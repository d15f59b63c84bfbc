"""The CPU training benchmark (`python -m train.bench train --config bench_cpu`): a small DeepSeek-V3-shaped model
with hidden size 512 whose matmuls are big enough for a CPU to run near its matmul peak.

4 layers of full MLA (8 heads, q/kv latents 256/128; at 512 tokens the dense masked softmax, `attention_impl=
"reference"`, is the cheaper kernel: one big matmul per head and nothing recomputed in the backward pass, where the
flash-style one rematerialises every query block): one dense SwiGLU layer (width 2048), then 3 MoE layers (8
routed experts of width 1024, top-2, one shared expert) on the einsum back end with capacity factor 1.25 (the 25%
padding is computed but not counted as model FLOPs). No MTP block: cost.py's model FLOPs leave it out, so the
benchmark does not run it either. Layers unrolled (`scan_layers=False`): a scan over layers stacks every layer's
saved activations into [layers, ...] buffers and slices them back in the backward pass, about a tenth of the step
in copies on CPU. 8 x 512 byte tokens of the stdlib corpus per step.
AdamW rather than the Muon recipe: Muon orthogonalises every matrix (each expert's too) with 10 Newton-Schulz
iterations per step, about 1.2 TFLOP here against the model's 0.54 TFLOP of forward and backward, none of it model
FLOPs; it only pays off at many more tokens per step than a CPU can take.
"""

from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig


def config() -> RunConfig:
    model = preset("tiny-v3", vocab_size=512, hidden_size=512, num_hidden_layers=4,
                   pattern="MMMM", num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                   qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2048, moe_intermediate_size=1024,
                   n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                   first_dense_layers=1, capacity_factor=1.25, moe_impl="einsum", num_nextn_predict_layers=0,
                   max_position_embeddings=4096, attention_impl="reference", scan_layers=False).replace(name="bench-cpu")
    return RunConfig(model, TrainConfig(optimizer="adamw", steps=20, batch_size=8, seq_len=512, warmup_steps=2,
                                        log_every=1, checkpoint_every=0, compute_dtype="float32"))
