"""Oracle tests: random tiny DeepseekV4ForCausalLM models from `transformers`, loaded through `v4jax.hf.load`.

Sequences of 48 tokens cross the window (8) six times, the CSA ratio (4) twelve times and the HCA ratio (16) three
times; index_topk (3) is smaller than the number of visible compressed entries, so the indexer's choice matters.
The indexer score sum_h w_h relu(q_h . k) is exactly 0 when every head's dot product is negative, and top-k among
tied scores is implementation-defined; 16 indexer heads make such ties (probability 2^-16 per pair) vanish.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from oracle import assert_close, torch_logits
from v4jax import hf, model

W, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def tiny_v4_config(layer_types=(W, W, C, H, C, H, C), hash_layers=3, **overrides) -> DeepseekV4Config:
    n = len(layer_types)
    fields = dict(
        vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=n, num_attention_heads=4,
        head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        index_n_heads=16, index_head_dim=16, index_topk=3, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, hc_mult=4, hc_sinkhorn_iters=20, layer_types=list(layer_types),
        compress_rates={C: 4, H: 16}, mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (n - hash_layers),
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1},
        swiglu_limit=10.0, routed_scaling_factor=1.5, scoring_func="sqrtsoftplus",
    )
    return DeepseekV4Config(**(fields | overrides))


def randomized(config: DeepseekV4Config, seed: int = 0) -> DeepseekV4ForCausalLM:
    """Every parameter and buffer random: sinks, position biases, mHC, router bias and the hash table too."""
    torch.manual_seed(seed)
    reference = DeepseekV4ForCausalLM(config).eval()
    k, e = config.num_experts_per_tok, config.n_routed_experts
    with torch.no_grad():
        for name, tensor in list(reference.named_parameters()) + list(reference.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("tid2eid"):
                tensor.copy_(torch.stack([torch.randperm(e)[:k] for _ in range(tensor.shape[0])]))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))
            elif name.endswith(("scale", "hc_scale")):
                tensor.copy_(1.0 + 0.5 * torch.randn_like(tensor))
            elif name.endswith(("sinks", "base", "hc_base", "position_bias", "e_score_correction_bias")):
                tensor.copy_(0.5 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return reference



@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 320, size=(2, 48)).astype(np.int64)



@pytest.mark.parametrize("layer_types", [(W, W, C, H, C, H, C), (H, H, C, H, C)], ids=["flash-like", "pro-like"])
def test_logits_match_transformers(tmp_path, tokens, layer_types):
    reference = randomized(tiny_v4_config(layer_types))
    reference.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.explicit_pattern == "".join({W: "W", C: "C", H: "H"}[t] for t in layer_types)
    assert cfg.first_hash_layers == 3 and cfg.hc_mult == 4
    ours = model.forward(cfg, params, jnp.asarray(tokens, jnp.int32))
    rel = assert_close(ours, torch_logits(reference, tokens))
    print(f"{cfg.explicit_pattern}: max abs error / logit scale = {rel:.2e}")


def test_round_trip_through_transformers(tmp_path, tokens):
    reference = randomized(tiny_v4_config(), seed=1)
    reference.save_pretrained(tmp_path / "a")
    cfg, params = hf.load(tmp_path / "a")
    hf.save(tmp_path / "b", cfg, params)
    reloaded = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert_close(torch_logits(reloaded, tokens), torch_logits(reference, tokens), rel=1e-6)


def test_in_memory_naming_legacy_config_keys_and_fp8_ue8m0(tmp_path, tokens):
    """The same model stored in transformers' in-memory names (fused experts, self_attn.*), with legacy config keys
    (compress_ratios, num_hash_layers) and FP8 weights with UE8M0 (power-of-two) block scales, loads to the same
    logits as its dequantized float32 twin."""
    import json

    from safetensors.torch import save_file

    reference = randomized(tiny_v4_config(), seed=3)
    config = json.loads(reference.config.to_json_string())
    legacy = {k: v for k, v in config.items() if k not in ("layer_types", "mlp_layer_types", "compress_rates")}
    legacy |= {"compress_ratios": [{W: 0, C: 4, H: 16}[t] for t in config["layer_types"]] + [0],
               "num_hash_layers": 3}
    legacy |= {"compress_rate_csa": 4, "compress_rate_hca": 16}
    original, quantized, dequantized = {}, {}, {}
    rng = np.random.default_rng(0)
    for name, tensor in reference.state_dict().items():
        if "inv_freq" in name:
            continue
        original[name] = tensor.contiguous()
        if tensor.ndim == 2 and name.endswith("q_b_proj.weight"):
            rows, cols = -(-tensor.shape[0] // 128), -(-tensor.shape[1] // 128)
            scale = torch.tensor(2.0 ** rng.integers(-8, -4, size=(rows, cols)), dtype=torch.float32)
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:tensor.shape[0], :tensor.shape[1]]
            q = (tensor / full).to(torch.float8_e4m3fn)
            quantized[name], quantized[name[:-len("weight")] + "weight_scale_inv"] = q, scale.to(torch.float8_e8m0fnu)
            dequantized[name] = q.float() * full
        else:
            quantized[name] = dequantized[name] = tensor.contiguous()
    for folder, tensors in (("orig", original), ("fp8", quantized), ("deq", dequantized)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(legacy))
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))
    cfg8, params8 = hf.load(tmp_path / "fp8")
    cfg32, params32 = hf.load(tmp_path / "deq")
    assert cfg8.explicit_pattern == "WWCHCHC" and cfg8.first_hash_layers == 3
    t = jnp.asarray(tokens, jnp.int32)
    np.testing.assert_allclose(model.forward(cfg8, params8, t), model.forward(cfg32, params32, t), atol=1e-5)
    cfg, params = hf.load(tmp_path / "orig")
    assert_close(model.forward(cfg, params, t), torch_logits(reference, tokens))
