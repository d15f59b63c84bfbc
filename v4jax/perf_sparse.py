"""Performance suite, section 3, sparse scaling: time and memory of one layer of each attention kind at 2K-32K
tokens, and the bytes of a 1M-token V4-Flash serving cache against a V3 MLA stack of the same depth.

`scaling()`: one layer of each kind M (full MLA), S (sliding-window MLA), W (V4 window), C (CSA), H (HCA), built
and timed as `bench.attention` does (`bench.attention_config` on tiny-v4 with `bench.ATTENTION_SETTINGS`: V4-Flash's
per-head widths, window, ratios and top-k at 4 heads, V3's MLA widths for M/S; float32; batch 1; forward only). Per
(kind, length): the median ms of the ahead-of-time compiled layer (a kind's lengths timed round-robin by
`bench.interleaved_runs` after a warm-up) and XLA's own memory account of that compiled program
(`memory_analysis()`: temp, argument and output bytes). Lengths go up in order; before compiling one, its forward
time is predicted from the previous length's warm-up call times the cost model's FLOPs ratio (at least the token
ratio): a point predicted over `POINT_BUDGET_S` seconds is reported as skipped with that prediction, never dropped
silently. Points whose repeats would take longer than the budget get fewer of them (`repeats` says how many).
Growth compares the two longest measured lengths of a kind (`bench._growth`: measured time ratio, linear and
quadratic ratios, exponent, verdict; `bench.flops_ratio`: the cost model's) plus the ratio of XLA's temp bytes.

`cache_bytes()`: the serving cache (`serving.cache.init_cache`, the constructor `serving.engine` and
`serving.bench` call) under `jax.eval_shape`, so nothing is allocated, at batch 1 and `context` tokens, for the
deepseek-v4-flash preset and for deepseek-v3-671b cut to V4-Flash's 43 layers (every layer M: latent 512 + rope
64). Dtype: each preset's compute dtype (bfloat16 for both), which is what `init_cache` stores when given none;
the V4 compressors' pending-block states are float32 whatever the dtype. Each figure is checked against
`cost.kv_cache_bytes(..., include_state=True)` in `cost.plain_format(dtype)` (the analytic model).

Timings are noisy on a shared machine: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import collections
import statistics
import time

import jax
import jax.numpy as jnp

from v4jax import bench, cost, model
from v4jax.bench import Progress, _say, _table
from v4jax.config import AttentionKind, ModelConfig, preset
from v4jax.moe.bench import memory
from v4jax.serving import cache as cache_lib

KINDS = ("M", "S", "W", "C", "H")
SEQS = (2048, 4096, 8192, 16384, 32768)
QUICK_SEQS = (256, 512)
REPEATS, QUICK_REPEATS = 3, 2
# A point whose one forward is predicted to take longer than this is skipped (with the reason); one whose repeats
# would take longer is timed fewer times (at least once).
POINT_BUDGET_S = 30.0
BASE = "tiny-v4"  # the preset `bench.attention_config` completes with ATTENTION_SETTINGS (train.bench's default)
CONTEXT = 1_048_576
V4_PRESET, V3_PRESET = "deepseek-v4-flash", "deepseek-v3-671b"
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------------------------
# scaling: one layer per kind at several lengths


def layer_config(kinds=KINDS) -> ModelConfig:
    """The config `python -m train.bench attention` times by default: tiny-v4 with `bench.ATTENTION_SETTINGS`."""
    return bench.attention_config(preset(BASE), kinds, **bench.ATTENTION_SETTINGS)


def _predicted_s(cfg: ModelConfig, kind: AttentionKind, last: tuple[int, float] | None, seq: int) -> float | None:
    """One forward at `seq`, from the last measured (length, warm-up s) times the cost model's FLOPs ratio (at
    least the token ratio); None with nothing measured yet."""
    if last is None:
        return None
    short, seconds = last
    return seconds * max(seq / short, bench.flops_ratio(cfg, kind, short, seq))


def _kind_points(cfg: ModelConfig, kind: AttentionKind, seqs, key: int, budget_s: float, progress: Progress):
    """Compile and warm up `kind` at each length in order, skipping those predicted over `budget_s`:
    ([(seq, compiled, args, compile s, memory, warm-up s)], {seq: skipped row})."""
    params = bench.layer_params(cfg, jax.random.key(key), kind)
    kept, skipped, last = [], {}, None
    for seq in seqs:
        predicted = _predicted_s(cfg, kind, last, seq)
        if predicted is not None and predicted > budget_s:
            reason = (f"predicted {predicted:.0f} s per forward ({last[1]:.2f} s at {last[0]} tokens x the cost "
                      f"model's growth), over the {budget_s:g} s budget per point")
            skipped[seq] = {"kind": kind.value, "seq": seq, "skipped": reason, "predicted_s": predicted}
            _say(progress, f"{kind.value} at {seq} tokens: skipped: {reason}")
            continue
        compiled, args, compile_s = bench.compile_layer(cfg, kind, seq, 1, params, progress)
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        warm_s = time.perf_counter() - start
        kept.append((seq, compiled, args, compile_s, memory(compiled), warm_s))
        last = (seq, warm_s)
    return kept, skipped


def _time_kind(cfg: ModelConfig, kind: AttentionKind, seqs, repeats: int, key: int, budget_s: float,
               progress: Progress) -> list[dict]:
    """One row per length: measured (ms, memory, repeats) or skipped (reason)."""
    kept, skipped = _kind_points(cfg, kind, seqs, key, budget_s, progress)
    if kept:
        _say(progress, f"timing one {kind.value} layer at {', '.join(str(p[0]) for p in kept)} tokens "
                       f"({repeats} rounds after a warm-up)...")
    times, _ = bench.interleaved_runs([(p[1], p[2]) for p in kept], repeats=repeats, budget_s=budget_s,
                                      progress=progress)
    rows = dict(skipped)
    for (seq, _, _, compile_s, mem, probe_s), ts in zip(kept, times):
        row = {"kind": kind.value, "seq": seq, "step_s": statistics.median(ts), "ms": 1e3 * statistics.median(ts),
               "repeats": len(ts), "times_s": ts, "probe_s": probe_s, "compile_s": compile_s, **mem}
        rows[seq] = row
        temp = "?" if mem["temp_bytes"] is None else f"{mem['temp_bytes'] / MIB:.1f} MiB"
        _say(progress, f"{kind.value} at {seq} tokens: {row['ms']:.1f} ms (median of {len(ts)}), temp {temp}, "
                       f"compile {compile_s:.1f} s")
    return [rows[seq] for seq in seqs]


def _kind_growth(cfg: ModelConfig, kind: AttentionKind, rows: list[dict]) -> dict:
    """`bench._growth` between the two longest measured lengths, with the cost model's FLOPs ratio and the temp
    bytes ratio; {"skipped": reason} with fewer than two measured."""
    measured = [r for r in rows if "skipped" not in r]
    if len(measured) < 2:
        return {"skipped": f"{len(measured)} measured length(s); growth needs two"}
    a, b = measured[-2:]
    growth = bench._growth(a["step_s"], b["step_s"], a["seq"], b["seq"])
    growth["flops"] = bench.flops_ratio(cfg, kind, a["seq"], b["seq"])
    if a["temp_bytes"] and b["temp_bytes"] is not None:
        growth["temp_bytes"] = b["temp_bytes"] / a["temp_bytes"]
    if b["seq"] != rows[-1]["seq"]:
        growth["note"] = f"longest measured length {b['seq']} (longer ones skipped)"
    return growth


def scaling(quick: bool = False, progress: Progress = None, *, kinds=KINDS, seqs=None, repeats: int | None = None,
            budget_s: float = POINT_BUDGET_S) -> dict:
    """One layer of each kind in `kinds` at each length (default 2K-32K, quick 256 and 512): median ms per forward
    at batch 1, XLA's temp / argument / output bytes, skipped points with their reason, growth per kind."""
    kinds = tuple(dict.fromkeys(AttentionKind(k) for k in kinds))
    seqs = sorted(set(seqs or (QUICK_SEQS if quick else SEQS)))
    repeats = repeats or (QUICK_REPEATS if quick else REPEATS)
    if not kinds or not seqs or min(seqs) < 1 or repeats < 1:
        raise ValueError(f"need kinds, lengths >= 1 and repeats >= 1; got {kinds}, {seqs}, {repeats}")
    cfg = layer_config(kinds)
    started = time.perf_counter()
    rows, growth = [], {}
    for i, kind in enumerate(kinds):
        _say(progress, f"sparse scaling: one {kind.value} layer at {', '.join(map(str, seqs))} tokens...")
        kind_rows = _time_kind(cfg, kind, seqs, repeats, 3 + i, budget_s, progress)
        rows += kind_rows
        growth[kind.value] = _kind_growth(cfg, kind, kind_rows)
    fields = ("hidden_size", "num_attention_heads", "qk_rope_head_dim", "head_dim", "o_groups", "o_lora_rank",
              "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
              *bench.ATTENTION_SETTINGS, "dtype")
    return {
        "config": cfg.name, "settings": {f: getattr(cfg, f) for f in dict.fromkeys(fields)},
        "kinds": [k.value for k in kinds], "seqs": seqs, "batch": 1, "repeats": repeats, "budget_s": budget_s,
        "quick": quick, "backend": jax.default_backend(), "devices": jax.device_count(), "layers": rows,
        "growth": growth, "skipped": [r for r in rows if "skipped" in r], "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------
# the 1M-token serving cache


def v3_config(layers: int) -> ModelConfig:
    """deepseek-v3-671b at `layers` layers: every layer M (MLA latent 512 + rope 64); its MoE is irrelevant here."""
    return preset(V3_PRESET, num_hidden_layers=layers)


def _layer_caches(cfg: ModelConfig, cache: cache_lib.Cache):
    """(kind, one layer's cache arrays, layers they hold) in `model.layout` order: the unit's arrays hold
    `repeats` layers each."""
    lay, specs = model.layout(cfg), cfg.layers
    for i, arrays in enumerate(cache.prefix):
        yield specs[i].attention, arrays, 1
    for j, arrays in enumerate(cache.unit):
        yield specs[lay.prefix + j].attention, arrays, lay.repeats
    for s, arrays in enumerate(cache.suffix):
        yield specs[cfg.num_hidden_layers - lay.suffix + s].attention, arrays, 1


def _nbytes(arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(arrays))


def stack_cache(cfg: ModelConfig, context: int, batch: int = 1) -> dict:
    """`init_cache(cfg, batch, context)` under `jax.eval_shape` (its default dtype: the compute dtype): bytes,
    bytes per token, per kind and per dtype, each next to `cost`'s analytic figure in that dtype's plain format."""
    spec = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, context))
    dtype = jnp.dtype(cfg.dtype)
    fmt = cost.plain_format(dtype)
    total = cache_lib.cache_bytes(spec)
    kinds: dict[str, dict] = {}
    for kind, arrays, layers in _layer_caches(cfg, spec):
        row = kinds.setdefault(kind.value, {"layers": 0, "bytes": 0, "arrays": {}})
        row["layers"] += layers
        row["bytes"] += _nbytes(arrays)
        row["arrays"] |= {name: {"shape": list(a.shape[-3:]), "dtype": a.dtype.name} for name, a in arrays.items()}
    counts = collections.Counter(s.attention.value for s in cfg.layers)
    for letter, row in kinds.items():
        kind = AttentionKind(letter)
        row["analytic_bytes"] = batch * counts[letter] * cost.kv_bytes(cfg, kind, context, fmt, include_state=True)
        row["bytes_per_token"] = row["bytes"] / (batch * context)
        row["analytic_bytes_per_token_per_layer"] = cost.kv_bytes_per_token(cfg, kind, context, fmt)
    by_dtype: dict[str, int] = collections.Counter()
    for a in jax.tree.leaves(spec.layers):
        by_dtype[a.dtype.name] += a.size * a.dtype.itemsize
    return {
        "config": cfg.name, "pattern": cfg.explicit_pattern, "layers": cfg.num_hidden_layers, "batch": batch,
        "context": context, "dtype": dtype.name, "format": fmt.name, "bytes": total,
        "bytes_per_token": total / (batch * context),
        "analytic_bytes": cost.kv_cache_bytes(cfg, context, fmt, batch, include_state=True),
        "kinds": kinds, "dtypes": dict(by_dtype), "lengths_bytes": _nbytes(spec.lengths),
    }


def cache_bytes(context: int = CONTEXT) -> dict:
    """A V4-Flash serving cache of one `context`-token row against a V3 MLA stack of the same depth (module
    docstring): both as `stack_cache` rows, V3 / V4 from the real and the analytic bytes, and for scale the
    production formats' analytic figures (V4's FP8 layout, V3.2 FlashMLA's FP8 latent for the MLA stack)."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    v4 = preset(V4_PRESET)
    v3 = v3_config(v4.num_hidden_layers)
    ours, theirs = stack_cache(v4, context), stack_cache(v3, context)
    v4_fp8 = cost.kv_cache_bytes(v4, context, cost.V4_FP8, include_state=True)
    v3_fp8 = cost.kv_cache_bytes(v3, context, cost.V32_FP8)
    return {
        "context": context, "batch": 1,
        "constructor": "v4jax.serving.cache.init_cache under jax.eval_shape (nothing allocated)",
        "dtype_choice": (f"each preset's compute dtype, init_cache's default ({ours['dtype']} for {v4.name}, "
                         f"{theirs['dtype']} for {v3.name}); compressor states float32"),
        "v4": ours, "v3": theirs,
        "v3_description": f"{V3_PRESET} attention (MLA: kv_lora_rank {v3.kv_lora_rank} + rope "
                          f"{v3.qk_rope_head_dim}) at {v4.name}'s {v4.num_hidden_layers} layers",
        "ratio_v3_over_v4": theirs["bytes"] / ours["bytes"],
        "analytic_ratio_v3_over_v4": theirs["analytic_bytes"] / ours["analytic_bytes"],
        "production_formats": {"v4_format": cost.V4_FP8.name, "v4_bytes": v4_fp8, "v3_format": cost.V32_FP8.name,
                               "v3_bytes": v3_fp8, "ratio_v3_over_v4": v3_fp8 / v4_fp8},
    }


def run(quick: bool = False, progress: Progress = None) -> dict:
    """Section 3 of the suite: {"scaling": scaling(quick), "cache_1m": cache_bytes()} (JSON-able)."""
    return {"scaling": scaling(quick, progress), "cache_1m": cache_bytes()}


# ---------------------------------------------------------------------------------------------------------------
# report


def _gb(x: float) -> str:
    return cost._si(x, "B")


def scaling_markdown(s: dict) -> str:
    row = {(r["kind"], r["seq"]): r for r in s["layers"]}
    st = s["settings"]
    title = (f"One attention layer per kind ({s['config']} + bench.ATTENTION_SETTINGS: hidden {st['hidden_size']}, "
             f"{st['num_attention_heads']} heads, window {st['sliding_window']}, C ratio {st['csa_compress_ratio']} "
             f"top-{st['index_topk']}, H ratio {st['hca_compress_ratio']}, {st['dtype']}), {s['backend']}, batch "
             f"{s['batch']}, forward; median ms of up to {s['repeats']} (each kind's lengths round-robin) / XLA "
             f"temp MiB (`memory_analysis`); {s['seconds']:.0f} s in all.")
    out = [title, ""]

    def cell(k, t):
        r = row[(k, t)]
        if "skipped" in r:
            return f"skipped (~{r['predicted_s']:.0f} s)"
        temp = "?" if r["temp_bytes"] is None else f"{r['temp_bytes'] / MIB:.1f}"
        return f"{r['ms']:.1f}{'*' if r['repeats'] < s['repeats'] else ''} / {temp}"

    body = []
    for k in s["kinds"]:
        g = s["growth"][k]
        verdict = (g["skipped"] if "skipped" in g else
                   f"{g['measured']:.2f}x for {g['linear']:g}x tokens ({g['from_seq']}->{g['to_seq']}; linear "
                   f"{g['linear']:g} / quadratic {g['quadratic']:g}, FLOPs {g['flops']:.2f}, temp "
                   f"{g.get('temp_bytes', float('nan')):.2f}x): {g['verdict']}")
        body.append([k, *(cell(k, t) for t in s["seqs"]), verdict])
    out += _table(["kind", *(f"{t} ms / MiB" for t in s["seqs"]), "growth (two longest measured)"], body)
    notes = []
    if any(r.get("repeats", s["repeats"]) < s["repeats"] for r in s["layers"]):
        notes.append(f"*: fewer repeats (over the {s['budget_s']:g} s budget)")
    notes += [f"{r['kind']} at {r['seq']}: {r['skipped']}" for r in s["skipped"]]
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    return "\n".join(out)


def cache_markdown(c: dict) -> str:
    v4, v3, prod = c["v4"], c["v3"], c["production_formats"]
    title = (f"Serving cache at {c['context']:,} tokens, batch 1 (`serving.cache.init_cache` under "
             f"`jax.eval_shape`; {c['dtype_choice']}):")
    out = [title, ""]
    rows = [[f"{x['config']} `{x['pattern'][:12]}...` ({x['layers']} layers)", x["dtype"],
             f"{_gb(x['bytes'])} ({x['bytes']:,})", f"{x['bytes_per_token']:,.0f}", f"{x['analytic_bytes']:,}"]
            for x in (v4, v3)]
    rows.append(["V3 MLA / V4-Flash", "", f"{c['ratio_v3_over_v4']:.2f}x", "",
                 f"{c['analytic_ratio_v3_over_v4']:.2f}x"])
    out += _table(["stack", "dtype", "bytes", "bytes/token", "cost.py"], rows)
    out += ["", "V4-Flash by layer kind:", ""]
    out += _table(["kind", "layers", "bytes", "bytes/token", "cost.py"],
                  [[k, str(r["layers"]), f"{_gb(r['bytes'])} ({r['bytes']:,})", f"{r['bytes_per_token']:,.1f}",
                    f"{r['analytic_bytes']:,}"] for k, r in v4["kinds"].items()])
    production = (f"Production formats (cost.py only): V4-Flash {prod['v4_format']} {_gb(prod['v4_bytes'])}, V3 "
                  f"MLA {prod['v3_format']} {_gb(prod['v3_bytes'])}: {prod['ratio_v3_over_v4']:.2f}x.")
    out += ["", production]
    return "\n".join(out)


def markdown(result: dict) -> str:
    """Both tables of `run`'s result (either part may be missing)."""
    parts = []
    if "scaling" in result:
        parts.append(scaling_markdown(result["scaling"]))
    if "cache_1m" in result:
        parts.append(cache_markdown(result["cache_1m"]))
    return "\n\n".join(parts)
