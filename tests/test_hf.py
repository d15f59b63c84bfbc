"""Oracle tests: random tiny DeepseekV3ForCausalLM models from `transformers`, loaded through `v4jax.hf.load`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from oracle import assert_close, torch_logits
from v4jax import hf, model

YARN = {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 1.0}


def tiny_hf_config(**overrides) -> DeepseekV3Config:
    fields = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=24, q_lora_rank=40, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    return DeepseekV3Config(**(fields | overrides))


def randomized(config: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    """Every parameter and buffer random (norm weights around 1, biases nonzero), so no mapping hides."""
    torch.manual_seed(seed)
    reference = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in list(reference.named_parameters()) + list(reference.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.1 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.08 * torch.randn_like(tensor))
    return reference



@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 320, size=(3, 48)).astype(np.int64)



@pytest.mark.parametrize("rope", [None, YARN], ids=["rope", "yarn"])
def test_logits_match_transformers(tmp_path, tokens, rope):
    overrides = {} if rope is None else {"rope_parameters": dict(YARN)}
    reference = randomized(tiny_hf_config(**overrides))
    reference.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert (cfg.rope_scaling is None) == (rope is None)
    assert cfg.first_dense_layers == 1 and cfg.n_group == 4
    ours = model.forward(cfg, params, jnp.asarray(tokens, jnp.int32))
    rel = assert_close(ours, torch_logits(reference, tokens))
    print(f"rope={'yarn' if rope else 'default'}: max abs error / logit scale = {rel:.2e}")


def test_direct_query_projection_and_half_layout_rope(tmp_path, tokens):
    """q_lora_rank=None (a direct q_proj) and rope_interleave=False checkpoints load too."""
    reference = randomized(tiny_hf_config(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0))
    reference.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.q_lora_rank is None
    assert_close(model.forward(cfg, params, jnp.asarray(tokens, jnp.int32)), torch_logits(reference, tokens))


def test_round_trip_through_transformers(tmp_path, tokens):
    reference = randomized(tiny_hf_config(rope_parameters=dict(YARN)), seed=1)
    reference.save_pretrained(tmp_path / "a")
    cfg, params = hf.load(tmp_path / "a")
    hf.save(tmp_path / "b", cfg, params, max_shard_bytes=200_000)  # several shards + index
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert_close(torch_logits(reloaded, tokens), torch_logits(reference, tokens), rel=1e-6)
    cfg2, params2 = hf.load(tmp_path / "b")
    assert cfg2 == cfg
    np.testing.assert_array_equal(model.forward(cfg2, params2, tokens), model.forward(cfg, params, tokens))


def test_mtp_weights_round_trip(tmp_path, tokens):
    """MTP tensors live under model.layers.{num_hidden_layers}; save writes them and load reads them back."""
    from v4jax import config

    cfg = config.preset("tiny-v3")
    params = model.init(cfg, jax.random.key(3))
    hf.save(tmp_path, cfg, params)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.4.eh_proj.weight" in names and "model.layers.4.mlp.experts.7.down_proj.weight" in names
    cfg2, params2 = hf.load(tmp_path)
    assert cfg2.num_nextn_predict_layers == 1
    a = model.apply(cfg, params, jnp.asarray(tokens[:, :16], jnp.int32))
    b = model.apply(cfg2, params2, jnp.asarray(tokens[:, :16], jnp.int32))
    np.testing.assert_allclose(b.mtp_logits, a.mtp_logits, atol=1e-6)


def test_fp8_block_quantized_weights_are_dequantized(tmp_path, tokens):
    """DeepSeek's release format: float8_e4m3 weights with a float32 scale per 128 x 128 block."""
    reference = randomized(tiny_hf_config(hidden_size=160, intermediate_size=200), seed=2)
    reference.save_pretrained(tmp_path / "fp32")
    tensors = load_file(tmp_path / "fp32" / "model.safetensors")
    quantized, dequantized = {}, {}
    rng = np.random.default_rng(0)
    for name, weight in tensors.items():
        if weight.ndim == 2 and "proj" in name:
            rows, cols = -(-weight.shape[0] // 128), -(-weight.shape[1] // 128)
            scale_inv = rng.uniform(0.5, 2.0, size=(rows, cols)).astype(np.float32) * 0.01
            full = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[:weight.shape[0], :weight.shape[1]]
            q = torch.tensor(weight / full).to(torch.float8_e4m3fn)
            quantized[name] = q
            quantized[name.removesuffix(".weight") + ".weight_scale_inv"] = torch.tensor(scale_inv)
            dequantized[name] = q.float().numpy() * full
        else:
            quantized[name] = torch.tensor(weight)
            dequantized[name] = weight
    from safetensors.torch import save_file as save_torch

    for folder, content in (("fp8", None), ("deq", dequantized)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text((tmp_path / "fp32" / "config.json").read_text())
    save_torch(quantized, str(tmp_path / "fp8" / "model.safetensors"))
    save_file(dequantized, str(tmp_path / "deq" / "model.safetensors"))
    cfg8, params8 = hf.load(tmp_path / "fp8")
    cfg32, params32 = hf.load(tmp_path / "deq")
    t = jnp.asarray(tokens[:, :24], jnp.int32)
    np.testing.assert_allclose(model.forward(cfg8, params8, t), model.forward(cfg32, params32, t), atol=1e-5)
    # and the quantization really changed the weights (so the test could fail)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert not np.allclose(dequantized[name], tensors[name], atol=1e-6)


def test_unknown_model_type_and_missing_tensors_are_named(tmp_path):
    reference = randomized(tiny_hf_config())
    reference.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")
    for name in ("model.layers.1.mlp.experts.5.up_proj.weight", "model.norm.weight"):
        tensors.pop(name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors: .*experts.5.up_proj.weight.*model.norm.weight|"
                                         "missing tensors: .*model.norm.weight.*experts.5.up_proj"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_json | {"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        hf.load(tmp_path)


def test_save_rejects_patterns_deepseek_v3_cannot_express(tmp_path, tiny_hybrid):
    cfg, params = tiny_hybrid
    with pytest.raises(ValueError, match="all full MLA"):
        hf.save(tmp_path, cfg, params)
    assert not any(tmp_path.iterdir())
