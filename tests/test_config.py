"""Config: the layer-pattern grammar, LayerSpec expansion, presets with overrides, and errors that name the field."""

import pytest

from v4jax import config
from v4jax.config import AttentionKind, LayerSpec, MlpKind, ModelConfig, expand_pattern, preset

M, S = AttentionKind.FULL, AttentionKind.SLIDING


def letters(pattern: str) -> str:
    return "".join(kind.value for kind in expand_pattern(pattern))


# ---------------------------------------------------------------------------------------------------------------
# grammar


@pytest.mark.parametrize("pattern, expected", [
    ("M", "M"),
    ("MSSS", "MSSS"),
    ("M[SSM]*2S", "MSSMSSMS"),
    ("[MSSS]*3", "MSSSMSSSMSSS"),
    ("[M[S]*2]*2", "MSSMSS"),  # nested repeat
    ("[[MS]*2S]*2M", "MSMSSMSMSSM"),  # nested repeat, then a letter
    ("S[M]*1S", "SMS"),
    ("[S]*10", "S" * 10),  # multi-digit count
])
def test_expand_pattern(pattern, expected):
    assert letters(pattern) == expected


def test_expand_pattern_returns_kinds():
    assert expand_pattern("M[SSM]*2S") == (M, S, S, M, S, S, M, S)
    assert all(isinstance(k, AttentionKind) for k in expand_pattern("[MS]*2"))


@pytest.mark.parametrize("pattern", [" M [ S S M ] * 2 S ", "M[SSM]*2S\n", "\tM [SSM]*2  S", "M[SSM] *2S"])
def test_expand_pattern_ignores_whitespace(pattern):
    assert letters(pattern) == "MSSMSSMS"


@pytest.mark.parametrize("pattern, why", [
    ("MXS", "unknown layer letter 'X'"),
    ("Mm", "unknown layer letter 'm'"),  # letters are case-sensitive
    ("[MS*2", "cannot parse"),  # '*' outside a close bracket
    ("[MS", "unclosed"),
    ("[[MS]*2", "unclosed"),
    ("MS]*2", "unmatched"),
    ("[MS]", "cannot parse"),  # a repeat needs its count
    ("[MS]*", "cannot parse"),
    ("[MS]*0", "count >= 1"),
    ("[]*2", "non-empty"),
    ("M-S", "cannot parse"),
])
def test_expand_pattern_errors_name_the_field(pattern, why):
    with pytest.raises(ValueError, match="ModelConfig.pattern") as info:
        expand_pattern(pattern)
    assert why in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# LayerSpec expansion


def test_layers_follow_pattern_and_first_dense_layers():
    cfg = preset("tiny-hybrid", first_dense_layers=2)
    assert cfg.explicit_pattern == "MSSSMSSSM"
    assert [spec.letter for spec in cfg.layers] == list("MSSSMSSSM")
    assert [spec.mlp for spec in cfg.layers] == [MlpKind.DENSE] * 2 + [MlpKind.MOE] * 7
    assert cfg.layers[1] == LayerSpec(S, MlpKind.DENSE)
    assert cfg.layers[2] == LayerSpec(S, MlpKind.MOE)
    assert cfg.mlp_kind(1) is MlpKind.DENSE and cfg.mlp_kind(2) is MlpKind.MOE


def test_tiny_v3_layers():
    cfg = preset("tiny-v3")
    assert cfg.pattern == "MMMM"  # an empty pattern means full MLA everywhere
    assert cfg.layers == (LayerSpec(M, MlpKind.DENSE),) + (LayerSpec(M, MlpKind.MOE),) * 3


@pytest.mark.parametrize("first_dense", [0, 4])
def test_first_dense_layers_bounds(first_dense):
    cfg = preset("tiny-v3", first_dense_layers=first_dense)
    expected = MlpKind.MOE if first_dense == 0 else MlpKind.DENSE
    assert [spec.mlp for spec in cfg.layers] == [expected] * 4


def test_no_routed_experts_means_dense_everywhere():
    cfg = preset("tiny-v3", n_routed_experts=0, num_experts_per_tok=0, first_dense_layers=0)
    assert not cfg.is_moe
    assert {spec.mlp for spec in cfg.layers} == {MlpKind.DENSE}


# ---------------------------------------------------------------------------------------------------------------
# presets and overrides


def test_preset_names():
    assert {"tiny-v3", "tiny-hybrid", "deepseek-v3-671b"} <= set(config.PRESETS)
    for name in ("tiny-v3", "tiny-hybrid", "deepseek-v3-671b"):
        assert preset(name).name == name


def test_preset_window_alias():
    cfg = preset("tiny-hybrid", window=7)
    assert cfg.sliding_window == 7
    assert preset("tiny-hybrid", sliding_window=7) == cfg


def test_preset_layers_alias():
    cfg = preset("tiny-v3", layers=6)
    assert cfg.num_hidden_layers == 6 and cfg.explicit_pattern == "MMMMMM"


def test_preset_pattern_override_rederives_layer_count():
    cfg = preset("tiny-hybrid", pattern="[MSSS]*2", window=16)
    assert cfg.num_hidden_layers == 8
    assert cfg.explicit_pattern == "MSSSMSSS"
    assert cfg.pattern == "[MSSS]*2"  # the compact form is kept; the explicit one is derived
    assert preset("tiny-v3", pattern="[MS]*5S").num_hidden_layers == 11


def test_preset_pattern_override_with_matching_count():
    assert preset("tiny-v3", pattern="MSMS", num_hidden_layers=4).explicit_pattern == "MSMS"


def test_preset_overrides_other_fields_and_keeps_the_rest():
    base = preset("tiny-v3")
    cfg = preset("tiny-v3", hidden_size=32, capacity_factor=1.25, moe_impl="dense")
    assert (cfg.hidden_size, cfg.capacity_factor, cfg.moe_impl) == (32, 1.25, config.MoeImpl.DENSE)
    assert cfg.vocab_size == base.vocab_size and cfg.n_routed_experts == base.n_routed_experts


def test_preset_rope_scaling_dict():
    cfg = preset("tiny-v3", rope_scaling=dict(factor=4.0, original_max_position_embeddings=256))
    assert cfg.rope_scaling == config.RopeScaling(factor=4.0, original_max_position_embeddings=256)


def test_replace_revalidates():
    cfg = preset("tiny-v3")
    assert cfg.replace(sliding_window=3).sliding_window == 3
    with pytest.raises(ValueError, match="ModelConfig.pattern"):
        cfg.replace(pattern="MS")  # `replace` does not re-derive num_hidden_layers (only `preset` does)


def test_config_is_hashable_and_frozen():
    cfg = preset("tiny-v3")
    assert hash(cfg) == hash(preset("tiny-v3"))
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1


def test_summary():
    text = preset("tiny-hybrid").summary()
    assert text.startswith("tiny-hybrid: 9 layers MSSSMSSSM")
    assert "6:3 sparse:full" in text
    assert "'M': 3" in text and "'S': 6" in text
    assert "window 16" in text and "top-2" in text
    compact = preset("tiny-hybrid", pattern="[MS]*2", window=5).summary()
    assert "4 layers MSMS" in compact and "2:2 sparse:full" in compact and "window 5" in compact
    assert "0:4 sparse:full" in preset("tiny-v3").summary()


def test_deepseek_v3_preset_sizes():
    cfg = preset("deepseek-v3-671b")
    assert cfg.num_hidden_layers == 61 and cfg.explicit_pattern == "M" * 61
    assert sum(spec.mlp is MlpKind.DENSE for spec in cfg.layers) == 3
    assert cfg.qk_head_dim == 192


def test_capacity():
    cfg = preset("tiny-v3")  # 8 experts, top-2
    assert config.capacity(cfg, 100) == 100
    assert config.capacity(cfg.replace(capacity_factor=0.5), 32) == 4  # ceil(0.5 * 32 * 2 / 8)
    assert config.capacity(cfg.replace(capacity_factor=1.0), 10) == 3  # ceil(2.5)
    assert config.capacity(cfg.replace(capacity_factor=100.0), 10) == 10  # never more than the tokens
    assert config.capacity(cfg.replace(capacity_factor=0.01), 3) == 1  # never zero


# ---------------------------------------------------------------------------------------------------------------
# errors name the field


@pytest.mark.parametrize("overrides, field", [
    (dict(pattern="MSM", num_hidden_layers=4), "pattern"),
    (dict(num_hidden_layers=5), "pattern"),  # tiny-hybrid's 9-layer pattern no longer fits
    (dict(pattern="MXS"), "pattern"),
    (dict(pattern="[MS"), "pattern"),
    (dict(pattern="MS]*2"), "pattern"),
    (dict(window=0), "sliding_window"),
    (dict(sliding_window=-3), "sliding_window"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # more than topk_group=2 groups x 2 experts hold
    (dict(n_group=3), "n_group"),
    (dict(n_group=8, topk_group=4), "n_group"),  # groups of one expert cannot take a top-2 group score
    (dict(topk_group=5), "topk_group"),
    (dict(first_dense_layers=10), "first_dense_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(moe_impl="bogus"), "moe_impl"),
    (dict(attention_impl="flash9"), "attention_impl"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(dtype="float64"), "dtype"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        preset("tiny-hybrid", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'tiny-v9'") as info:
        preset("tiny-v9")
    assert "tiny-v3" in str(info.value)  # the message lists the known names


def test_unknown_override_field():
    with pytest.raises(ValueError, match=r"ModelConfig\.hidden_sise\b"):
        preset("tiny-v3", hidden_sise=32)


def test_direct_construction_validates():
    base = preset("tiny-v3")
    fields = {f: getattr(base, f) for f in ModelConfig.__dataclass_fields__}
    assert ModelConfig(**fields) == base
    with pytest.raises(ValueError, match=r"ModelConfig\.pattern\b"):
        ModelConfig(**(fields | dict(pattern="MM")))


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-V4 fields


@pytest.mark.parametrize("name, layers, pattern", [
    ("deepseek-v4-flash", 43, "WW" + "CH" * 20 + "C"),
    ("deepseek-v4-pro", 61, "HH" + "CH" * 29 + "C"),
    ("tiny-v4", 7, "WWCHCHC"),
])
def test_v4_presets_have_the_released_patterns(name, layers, pattern):
    cfg = preset(name)
    assert cfg.num_hidden_layers == layers and cfg.explicit_pattern == pattern
    assert [spec.mlp for spec in cfg.layers[:4]] == [MlpKind.HASH] * 3 + [MlpKind.MOE]
    assert cfg.mtp_attention is AttentionKind.WINDOW and cfg.mlp_kind(layers) is MlpKind.MOE


@pytest.mark.parametrize("overrides, field", [
    (dict(head_dim=0), "head_dim"),
    (dict(o_groups=3), "o_groups"),
    (dict(o_lora_rank=0), "o_lora_rank"),
    (dict(index_topk=0), "index_topk"),
    (dict(csa_compress_ratio=0), "csa_compress_ratio"),
    (dict(hc_mult=0), "hc_mult"),
    (dict(swiglu_limit=-1.0), "swiglu_limit"),
    (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(qk_rope_head_dim=64), "qk_rope_head_dim"),
])
def test_v4_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        preset("tiny-v4", **overrides)
