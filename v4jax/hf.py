"""Hugging Face checkpoints <-> v4jax: `load(path)` and `save(path, cfg, params)` for `model_type: deepseek_v3`.

A folder holds config.json and one or more *.safetensors files (with model.safetensors.index.json when sharded).
DeepSeek's released weights are FP8 (e4m3) with a float32 `weight_scale_inv` per 128 x 128 block; they are
dequantized on load. Torch Linear weights are [out, in]; ours are [in, out] with heads as their own axis, so every
tensor goes through one `Rule` (HF name, our path, load transform, save transform) and both directions share it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from v4jax import model
from v4jax.config import AttentionKind, LayerSpec, MlpKind, ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v4")

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# ---------------------------------------------------------------------------------------------------------------
# safetensors reading (our own: numpy's safetensors backend cannot represent float8)


class TensorFolder:
    """Lazy, memory-mapped access to every tensor of a checkpoint folder, by name."""

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        self._where: dict[str, tuple[Path, dict]] = {}
        for file in files:
            for name, info in _header(file).items():
                self._where[name] = (file, info)
        self._maps: dict[Path, mmap.mmap] = {}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        file, info = self._where[name]
        if file not in self._maps:
            with open(file, "rb") as handle:
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        start, end = info["data_offsets"]
        base = 8 + info["header_len"]
        array = np.frombuffer(self._maps[file], dtype=_DTYPES[info["dtype"]], count=math.prod(info["shape"]),
                              offset=base + start).reshape(info["shape"])
        self.used.add(name)
        assert end - start == array.nbytes, f"{file}: corrupt entry {name}"
        return array


def _header(file: Path) -> dict[str, dict]:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        info["header_len"] = length
    return header


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """DeepSeek block FP8: w[i, j] * scale_inv[i // 128, j // 128], in float32 (scales float32 as in V3, or
    UE8M0 powers of two as in V4)."""
    rows, cols = weight.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
    return weight.astype(np.float32) * scale[:rows, :cols]


# ---------------------------------------------------------------------------------------------------------------
# config


def config_from_hf(hf: dict) -> ModelConfig:
    """A deepseek_v3 config.json -> ModelConfig."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (DeepSeek uses silu)")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (DeepSeek-V3 has no attention biases)")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ValueError("num_key_value_heads must equal num_attention_heads for MLA")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope type {rope_type!r} is not supported (default or yarn)")
    scaling = None
    if rope_type == "yarn":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                          hf["max_position_embeddings"])),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
    return ModelConfig(
        name=hf.get("_name_or_path") or "hf-deepseek-v3",
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rope_scaling=scaling, max_position_embeddings=hf["max_position_embeddings"],
        intermediate_size=hf["intermediate_size"], moe_intermediate_size=hf.get("moe_intermediate_size", 0),
        n_routed_experts=hf.get("n_routed_experts") or 0, n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok") or 0, n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, scoring_func=hf.get("scoring_func", "sigmoid"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        first_dense_layers=hf.get("first_k_dense_replace") or 0,
        num_nextn_predict_layers=hf.get("num_nextn_predict_layers", 0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    if set(cfg.explicit_pattern) != {AttentionKind.FULL.value}:
        raise ValueError(f"hf.save writes deepseek_v3 checkpoints, whose layers are all full MLA ('M'); "
                         f"{cfg.name} has pattern {cfg.explicit_pattern}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "rope_parameters": rope,
        "rope_interleave": True, "max_position_embeddings": cfg.max_position_embeddings,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
        "first_k_dense_replace": cfg.first_dense_layers, "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range, "attention_bias": False, "dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------------------------
# tensor rules


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple  # where the array lives in our per-layer (or top-level) pure dict
    hf: str  # the HF tensor name (experts: a `{e}` placeholder)
    load: Callable[[np.ndarray], np.ndarray] = np.transpose  # HF -> ours
    save: Callable[[np.ndarray], np.ndarray] = np.transpose  # ours -> HF
    per_expert: bool = False
    fused: tuple[str, int | None] | None = None  # transformers' fused experts tensor, and which half (gate/up)


def _keep(a):
    return a


def _heads_in(n: int):
    """[n*h, in] <-> [in, n, h]: a per-head output projection (q_b, kv_b, direct q)."""
    return (lambda a: a.reshape(n, -1, a.shape[-1]).transpose(2, 0, 1),
            lambda a: a.transpose(1, 2, 0).reshape(-1, a.shape[0]))


def _heads_out(n: int):
    """[d, n*v] <-> [n, v, d]: the attention output projection."""
    return (lambda a: a.T.reshape(n, -1, a.shape[0]), lambda a: a.reshape(-1, a.shape[-1]).T)


def fused_experts(prefix: str) -> dict[str, tuple[str, int | None]]:
    """transformers' in-memory expert layout: gate_up_proj [E, 2f, d] (gate rows, then up) and down_proj [E, d, f]."""
    return {"gate": (f"{prefix}experts.gate_up_proj", 0), "up": (f"{prefix}experts.gate_up_proj", 1),
            "down": (f"{prefix}experts.down_proj", None)}



def layer_rules(cfg: ModelConfig, mlp: MlpKind) -> list[Rule]:
    n = cfg.num_attention_heads
    heads_in, heads_out = _heads_in(n), _heads_out(n)
    rules = [
        Rule(("attn_norm", "weight"), "input_layernorm.weight", _keep, _keep),
        Rule(("mlp_norm", "weight"), "post_attention_layernorm.weight", _keep, _keep),
        Rule(("attn", "wkv_a"), "self_attn.kv_a_proj_with_mqa.weight"),
        Rule(("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", _keep, _keep),
        Rule(("attn", "wkv_b"), "self_attn.kv_b_proj.weight", *heads_in),
        Rule(("attn", "wo"), "self_attn.o_proj.weight", *heads_out),
    ]
    if cfg.q_lora_rank:
        rules += [Rule(("attn", "wq_a"), "self_attn.q_a_proj.weight"),
                  Rule(("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", _keep, _keep),
                  Rule(("attn", "wq_b"), "self_attn.q_b_proj.weight", *heads_in)]
    else:
        rules.append(Rule(("attn", "wq"), "self_attn.q_proj.weight", *heads_in))
    if mlp is MlpKind.DENSE:
        return rules + [Rule(("mlp", name), f"mlp.{name}_proj.weight") for name in ("gate", "up", "down")]
    rules += [Rule(("mlp", "router", "weight"), "mlp.gate.weight"),
              Rule(("mlp", "router", "bias"), "mlp.gate.e_score_correction_bias", _keep, _keep)]
    rules += [Rule(("mlp", "experts", name), f"mlp.experts.{{e}}.{name}_proj.weight", per_expert=True,
                   fused=fused_experts("mlp.")[name]) for name in ("gate", "up", "down")]
    if cfg.n_shared_experts:
        rules += [Rule(("mlp", "shared", name), f"mlp.shared_experts.{name}_proj.weight")
                  for name in ("gate", "up", "down")]
    return rules


def mtp_rules(cfg: ModelConfig) -> list[Rule]:
    """The MTP module is stored as decoder layer `num_hidden_layers` with a few extra tensors."""
    block = [dataclasses.replace(r, path=("block", *r.path)) for r in
             layer_rules(cfg, cfg.mlp_kind(cfg.num_hidden_layers))]
    return block + [Rule(("embed_norm", "weight"), "enorm.weight", _keep, _keep),
                    Rule(("hidden_norm", "weight"), "hnorm.weight", _keep, _keep),
                    Rule(("proj",), "eh_proj.weight"),
                    Rule(("norm", "weight"), "shared_head.norm.weight", _keep, _keep)]


def top_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule(("embed", "embedding"), "model.embed_tokens.weight", _keep, _keep),
             Rule(("norm", "weight"), "model.norm.weight", _keep, _keep)]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("head", "kernel"), "lm_head.weight"))
    return rules


# ---------------------------------------------------------------------------------------------------------------
# load


class _Reader:
    """Fetches HF tensors (float32, FP8 dequantized, rope layout fixed; integer tables as they are) by canonical
    name, and records the missing ones."""

    def __init__(self, folder: TensorFolder, hf_config: dict, cfg: ModelConfig,
                 canonical: Callable[[str], str] | None = None):
        self.folder, self.cfg, self.missing = folder, cfg, []
        self.names = {(canonical or _keep)(name): name for name in folder.names()}
        quant = hf_config.get("quantization_config") or {}
        self.block = tuple(quant.get("weight_block_size", (128, 128)))
        self.half_layout_rope = not hf_config.get("rope_interleave", True)

    def tensor(self, name: str) -> np.ndarray | None:
        if name not in self.names:
            self.missing.append(name)
            return None
        array = self.folder.get(self.names[name])
        scale = self.names.get(name.removesuffix(".weight") + ".weight_scale_inv")
        if np.issubdtype(array.dtype, np.integer):
            if scale:  # DeepSeek-V4's routed experts: two e2m1 values packed per int8 byte, 1 x 32 blocks
                raise ValueError(f"{self.names[name]}: FP4 (e2m1) packed weights are not supported; dequantize "
                                 f"the experts to FP8 or BF16 first")
            return np.asarray(array)
        array = dequantize_fp8(array, self.folder.get(scale), self.block) if scale else np.asarray(array, np.float32)
        return self._interleave_rope(name, array) if self.half_layout_rope else array

    def _interleave_rope(self, name: str, weight: np.ndarray) -> np.ndarray:
        """`rope_interleave: false` checkpoints rotate pairs (i, i + p/2); reorder each head's rope rows to
        DeepSeek's interleaved pairs (2i, 2i+1), which is what our rotation expects."""
        cfg, p = self.cfg, self.cfg.qk_rope_head_dim
        if name.endswith(("q_b_proj.weight", "q_proj.weight")):
            heads, head_dim = cfg.num_attention_heads, cfg.qk_head_dim
        elif name.endswith("kv_a_proj_with_mqa.weight"):
            heads, head_dim = 1, cfg.kv_lora_rank + p
        else:
            return weight
        order = np.stack([np.arange(p // 2), np.arange(p // 2) + p // 2], axis=1).reshape(-1)
        w = weight.reshape(heads, head_dim, -1).copy()
        w[:, head_dim - p:] = w[:, head_dim - p:][:, order]
        return w.reshape(weight.shape)

    def apply(self, rules: list[Rule], prefix: str) -> dict:
        tree: dict = {}
        for rule in rules:
            value = self._experts(rule, prefix) if rule.per_expert else self.tensor(prefix + rule.hf)
            if value is not None:
                _set(tree, rule.path, value if rule.per_expert else rule.load(value))
        return tree

    def _experts(self, rule: Rule, prefix: str) -> np.ndarray | None:
        """Stacked [E, ...] from per-expert tensors (DeepSeek's files) or transformers' fused layout."""
        fused_name, half = rule.fused
        if prefix + fused_name in self.names:
            stacked = np.asarray(self.folder.get(self.names[prefix + fused_name]), np.float32)
            if half is not None:
                stacked = np.split(stacked, 2, axis=1)[half]
            return stacked.transpose(0, 2, 1)
        parts = [self.tensor(prefix + rule.hf.format(e=e)) for e in range(self.cfg.n_routed_experts)]
        return None if any(p is None for p in parts) else np.stack([rule.load(p) for p in parts])


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class Family:
    """How one `model_type` names and shapes its tensors."""
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    top_rules: Callable[[ModelConfig], list[Rule]]
    layer_rules: Callable[[ModelConfig, LayerSpec], list[Rule]]
    layer_prefix: Callable[[int], str]
    mtp_rules: Callable[[ModelConfig], list[Rule]] | None = None
    canonical_name: Callable[[str], str] | None = None  # checkpoint name -> the name the rules use
    saved_name: Callable[[str], str] = _keep  # the rules' name -> the name `save` writes


def _family(model_type: str | None) -> Family:
    if model_type == "deepseek_v3":
        return Family(config_from_hf, config_to_hf, top_rules, lambda cfg, spec: layer_rules(cfg, spec.mlp),
                      lambda i: f"model.layers.{i}.", mtp_rules)
    if model_type == "deepseek_v4":
        from v4jax import hf_v4

        return Family(hf_v4.config_from_hf, hf_v4.config_to_hf, hf_v4.top_rules, hf_v4.layer_rules,
                      hf_v4.layer_prefix, canonical_name=hf_v4.canonical_name, saved_name=hf_v4.saved_name)
    raise ValueError(f"unsupported model_type {model_type!r}; v4jax.hf reads {SUPPORTED_MODEL_TYPES}")


def load(path: str | os.PathLike, mesh=None, rules=None) -> tuple[ModelConfig, nnx.State]:
    """A HF DeepSeek-V3 or -V4 folder -> (config, params), sharded over `mesh` when given."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    hf_config = json.loads(config_file.read_text())
    family = _family(hf_config.get("model_type"))
    folder = TensorFolder(path)
    cfg = family.config_from_hf(hf_config)
    reader = _Reader(folder, hf_config, cfg, family.canonical_name)
    mtp_prefix = family.layer_prefix(cfg.num_hidden_layers)
    has_mtp = family.mtp_rules is not None and any(name.startswith(mtp_prefix) for name in reader.names)
    cfg = cfg.replace(num_nextn_predict_layers=1 if has_mtp else 0)
    rest = reader.apply(family.top_rules(cfg), "")
    layers = [reader.apply(family.layer_rules(cfg, spec), family.layer_prefix(i))
              for i, spec in enumerate(cfg.layers)]
    if has_mtp:
        rest["mtp"] = reader.apply(family.mtp_rules(cfg), mtp_prefix)
    if reader.missing:
        shown = ", ".join(reader.missing[:12]) + (f" ... ({len(reader.missing)} in all)"
                                                   if len(reader.missing) > 12 else "")
        raise ValueError(f"{path}: checkpoint is missing tensors: {shown}")
    return cfg, model.merge_layers(cfg, rest, layers, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------------------------
# save


def _family_of(cfg: ModelConfig) -> Family:
    return _family("deepseek_v4" if any(spec.attention.is_v4 for spec in cfg.layers) else "deepseek_v3")


def hf_tensors(cfg: ModelConfig, params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the HF checkpoint for `params`, name by name (floats as float32, tables as int64)."""
    family = _family_of(cfg)
    rest, layers = model.split_layers(cfg, params)

    def emit(rules, tree, prefix):
        for rule in rules:
            value = np.asarray(_get(tree, rule.path))
            value = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32)
            if rule.per_expert:
                for e in range(value.shape[0]):
                    yield family.saved_name(prefix + rule.hf.format(e=e)), rule.save(value[e])
            else:
                yield family.saved_name(prefix + rule.hf), rule.save(value)

    yield from emit(family.top_rules(cfg), rest, "")
    for i, (spec, layer) in enumerate(zip(cfg.layers, layers)):
        yield from emit(family.layer_rules(cfg, spec), layer, family.layer_prefix(i))
    if cfg.num_nextn_predict_layers and family.mtp_rules is not None:
        yield from emit(family.mtp_rules(cfg), rest["mtp"], family.layer_prefix(cfg.num_hidden_layers))


def save(path: str | os.PathLike, cfg: ModelConfig, params: nnx.State, max_shard_bytes: int = 4 << 30) -> None:
    """Write a folder `transformers` loads with DeepseekV3/V4ForCausalLM.from_pretrained (float32 safetensors).
    V4's MTP block is not written (transformers does not read it).

    Files are written under temporary names and renamed last, so an interrupted save never looks complete.
    """
    from safetensors.numpy import save_file

    hf_config = _family_of(cfg).config_to_hf(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in hf_tensors(cfg, params):
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(path / (name + ".tmp")), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        total = sum(a.nbytes for shard in shards for a in shard.values())
        _write_text(path / "model.safetensors.index.json",
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in names:
        os.replace(path / (name + ".tmp"), path / name)
    _write_text(path / "config.json", json.dumps(hf_config, indent=2))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
