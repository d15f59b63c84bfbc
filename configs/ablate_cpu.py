"""The CPU ratio sweep (`python -m train.ablate --sweep ablate_cpu`, under 10 minutes on 2 cores): which 4-layer
stacks can recall past their window, and does it matter where the one global layer sits.

Task: MQAR with 8 bound key-value pairs (one token per pair, like a phonebook line; stride 2) at the start of a
64-token row and every key queried at the end, so each answer is more than 32 tokens (layers x window) before its
query and stacked window-8 layers cannot relay it. Chance is 1/8.
Two families of 4-layer models (hidden 64, dense MLPs, matched in size within 10%): MLA stacks of sliding (S) and
full (M) layers, and V4 stacks of window-only (W) layers with one compressed layer (H: ratio-2 entries, one pair
each; C: ratio-2 overlapping entries with the indexer's top-k covering all of them, since the training step gives
the indexer no gradient). The global layer goes first or last (the placement axis).

Tiny models need a larger initialisation (0.1 instead of 0.02) and a learning rate of 1e-2: at 0.02 the attention
logits start so flat that no stack leaves the 1/8 plateau within a few hundred steps.
"""

from v4jax.ablation.sweep import Sweep, variants
from v4jax.config import preset
from v4jax.training.config import RunConfig, TrainConfig

TASK = "synthetic:mqar:pairs=8,keys=8,values=8,stride=2,bound=1"
PATTERNS = ("SSSS", "MSSS", "SSSM", "WWWW", "HWWW", "CWWW")


def base_run(pattern: str = "MSSS", steps: int = 250, seq_len: int = 64, task: str = TASK) -> RunConfig:
    model = preset("tiny-v3", vocab_size=128, hidden_size=64, pattern=pattern, num_attention_heads=4,
                   q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                   intermediate_size=128, n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=0,
                   first_dense_layers=0, num_nextn_predict_layers=0, sliding_window=8, head_dim=32, o_groups=2,
                   o_lora_rank=16, csa_compress_ratio=2, hca_compress_ratio=2, index_n_heads=2, index_head_dim=16,
                   index_topk=64, attention_impl="reference", max_position_embeddings=1024,
                   initializer_range=0.1).replace(name="ablate-cpu")
    train = TrainConfig(optimizer="adamw", steps=steps, batch_size=32, seq_len=seq_len, learning_rate=1e-2,
                        warmup_steps=20, weight_decay=0.0, log_every=50, checkpoint_every=0, data=task)
    return RunConfig(model, train)


def sweep() -> Sweep:
    return Sweep(name="ablate_cpu", base=base_run(), variants=variants(PATTERNS), seeds=(0, 1))
