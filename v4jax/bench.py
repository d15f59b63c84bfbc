"""Forward-pass benchmarks: whole-model tokens/s, the cost of full (`M`) vs sliding-window (`S`) MLA layers, and
how one layer of each attention kind (M, S, W, C, H) grows with the sequence length.

Legend: b batch, t time, d model, n heads, w window.
`forward(cfg, seq=...)` and `attention(cfg, kinds, seqs)` return JSON-able dicts; `markdown(result)` and
`attention_markdown(result)` render them. Every timing is the median of `repeats` runs of an ahead-of-time compiled
function after one untimed warm-up run, each ended by `block_until_ready`; compile time is measured separately.
The attention benchmark times a kind's lengths round-robin, so drifts in the machine's load hit all of them alike.
Per-layer times come from one attention layer (`attention.make`) built and jitted on its own (projections +
kernel), so they isolate `kernels.blockwise` (M) from `kernels.banded` (S) and `kernels.v4_blockwise` (W, C, H).
Timings are noisy on shared machines: compare ratios from the same run, not absolute numbers across runs.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import cost, model
from v4jax.attention import make as make_attention
from v4jax.config import AttentionKind, ModelConfig
from v4jax.layers.linear import fill_random

KINDS = (AttentionKind.FULL, AttentionKind.SLIDING)
Progress = Callable[[str], None] | None


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


# ---------------------------------------------------------------------------------------------------------------
# timing


def compile_timed(fn, *args):
    """(ahead-of-time compiled `fn` for `args`, seconds spent lowering + compiling)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def median_seconds(compiled, *args, repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call."""
    return statistics.median(interleaved_seconds([(compiled, args)], repeats=repeats)[0])


def interleaved_seconds(runs, *, repeats: int, budget_s: float | None = None,
                        progress: Progress = None) -> list[list[float]]:
    """Wall times of each `(compiled, args)` in `runs`, after one untimed warm-up call of each, taken round-robin
    (one call of each per round) so that a change in the machine's load hits every run alike rather than the
    last ones. With `budget_s`, a run whose warm-up shows that `repeats` calls would take longer gets fewer calls
    (at least one): it sits out the last rounds."""
    return interleaved_runs(runs, repeats=repeats, budget_s=budget_s, progress=progress)[0]


def interleaved_runs(runs, *, repeats: int, budget_s: float | None = None, progress: Progress = None,
                     skip_slow: bool = False) -> tuple[list[list[float]], list[float]]:
    """`interleaved_seconds`, also returning each warm-up call's time. With `skip_slow`, a run whose warm-up alone
    took longer than `budget_s` is not called again (its times list stays empty)."""
    calls, warm_ups = [], []
    for compiled, args in runs:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        warm_up = time.perf_counter() - start
        warm_ups.append(warm_up)
        over = budget_s is not None and warm_up * repeats > budget_s
        calls.append(0 if over and skip_slow and warm_up > budget_s else
                     max(1, int(budget_s // warm_up)) if over else repeats)
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(max(calls, default=0)):
        if len(runs) > 1:
            _say(progress, f"  round {round_ + 1} of {repeats}...")
        for (compiled, args), n, out in zip(runs, calls, times):
            if round_ < n:
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                out.append(time.perf_counter() - start)
    return times, warm_ups


# ---------------------------------------------------------------------------------------------------------------
# measurements


def _inputs(shape, seed: int, *, high: int | None = None, dtype="float32") -> jax.Array:
    """Random tokens (`high` given) or activations, drawn on the host: no threefry kernel to compile per shape."""
    rng = np.random.default_rng(seed)
    if high is not None:
        return jnp.asarray(rng.integers(0, high, shape, dtype=np.int32))
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)


def time_model(cfg: ModelConfig, seq: int, batch: int, repeats: int, progress: Progress = None) -> dict:
    """Whole-model forward (logits only, so the unused MTP head is dead code): compile s, step s, tokens/s."""
    _say(progress, f"initialising {cfg.name}...")
    params = model.init(cfg, jax.random.key(0))
    tokens = _inputs((batch, seq), 1, high=cfg.vocab_size)
    _say(progress, f"compiling {cfg.name} forward (batch {batch}, seq {seq})...")
    compiled, compile_s = compile_timed(lambda p, t: model.apply(cfg, p, t).logits, params, tokens)
    _say(progress, f"timing {cfg.name} forward ({repeats} repeats)...")
    step_s = median_seconds(compiled, params, tokens, repeats=repeats)
    return {"compile_s": compile_s, "step_s": step_s, "tokens_per_s": batch * seq / step_s}


def _layer(cfg: ModelConfig, kind: AttentionKind) -> nnx.Module:
    return make_attention(cfg, kind, nnx.Rngs(0))


def layer_params(cfg: ModelConfig, key: jax.Array, kind: AttentionKind = AttentionKind.FULL) -> nnx.State:
    """Random parameters of one attention layer of `kind`. M and S share theirs (the window is static, not
    state); W, C and H each have their own (C adds the indexer, C and H a compressor).

    Filled by the model's own jitted `fill_random`: one threefry kernel, where building the layer eagerly
    compiles one per parameter shape (seconds each on a busy CPU).
    """
    abstract = nnx.state(nnx.eval_shape(lambda: _layer(cfg, kind)))
    return jax.jit(lambda k: fill_random(abstract, k))(key)


def compile_layer(cfg: ModelConfig, kind: AttentionKind, seq: int, batch: int, params: nnx.State,
                  progress: Progress = None):
    """One attention layer of `kind` on x [b, t, d], ahead-of-time compiled: (compiled, its args, compile s)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: _layer(cfg, kind)))
    x = _inputs((batch, seq, cfg.hidden_size), 2, dtype=cfg.dtype)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    segment_ids = jnp.zeros((batch, seq), jnp.int32)
    args = (params, x, positions, segment_ids)
    _say(progress, f"compiling one {kind.value} layer (batch {batch}, seq {seq})...")
    compiled, compile_s = compile_timed(lambda s, *rest: nnx.merge(graphdef, s)(*rest), *args)
    return compiled, args, compile_s


def time_layer(cfg: ModelConfig, kind: AttentionKind, seq: int, batch: int, repeats: int,
               params: nnx.State, progress: Progress = None) -> dict:
    """One attention layer of `kind` on x [b, t, d]: compile s and median step s."""
    compiled, args, compile_s = compile_layer(cfg, kind, seq, batch, params, progress)
    _say(progress, f"timing one {kind.value} layer ({repeats} repeats)...")
    return {"kind": kind.value, "seq": seq, "compile_s": compile_s,
            "step_s": median_seconds(compiled, *args, repeats=repeats)}


def time_layer_lengths(cfg: ModelConfig, kind: AttentionKind, seqs, batch: int, repeats: int, params: nnx.State,
                       progress: Progress = None, budget_s: float | None = None) -> list[dict]:
    """One layer of `kind` at every length in `seqs`, compiled first and then timed round-robin
    (`interleaved_seconds`), so the ratios between lengths come from the same stretch of machine load. Each row:
    compile s, median step s, every timed call's seconds and how many there were (fewer than `repeats` past
    `budget_s`)."""
    runs = [compile_layer(cfg, kind, seq, batch, params, progress) for seq in seqs]
    _say(progress, f"timing one {kind.value} layer at {', '.join(map(str, seqs))} tokens ({repeats} rounds after a "
                   f"warm-up)...")
    times = interleaved_seconds([(compiled, args) for compiled, args, _ in runs], repeats=repeats,
                                budget_s=budget_s, progress=progress)
    return [{"kind": kind.value, "seq": seq, "compile_s": compile_s, "step_s": statistics.median(ts),
             "repeats": len(ts), "times_s": ts} for seq, (_, _, compile_s), ts in zip(seqs, runs, times)]


# ---------------------------------------------------------------------------------------------------------------
# theory: attention work per layer (per batch row and head; the S/M ratios do not depend on those)


def visible_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs the causal (windowed) mask allows: the work an ideal kernel does."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def kernel_pairs(seq: int, window: int | None, block: int) -> int:
    """(query, key) pairs the kernels actually compute: whole blocks, as `kernels.blockwise` / `banded` do."""
    block = min(block, seq)
    blocks = math.ceil(seq / block)
    if window is None:
        return blocks * (blocks + 1) // 2 * block * block  # key blocks past the diagonal are skipped
    reach = math.ceil((window - 1) / block) * block
    return blocks * block * (reach + block)


def layer_flops(cfg: ModelConfig, seq: int, window: int | None) -> int:
    """Forward FLOPs of one MLA layer for one sequence: projections + the kernel's blocked attention."""
    d, n, r, p = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    h, v = cfg.qk_head_dim, cfg.v_head_dim
    query = d * cfg.q_lora_rank + cfg.q_lora_rank * n * h if cfg.q_lora_rank else d * n * h
    per_token = 2 * (query + d * (r + p) + r * n * (cfg.qk_nope_head_dim + v) + n * v * d)
    attention = 2 * n * (h + v) * kernel_pairs(seq, window, cfg.attention_block_size)
    return per_token * seq + attention


def flop_ratios(cfg: ModelConfig, seq: int) -> dict:
    """S/M ratios: ideal attention (masked pairs, ~2w/T), attention as blocked, whole layer incl. projections."""
    w = cfg.sliding_window
    return {
        "attention_ideal": visible_pairs(seq, w) / visible_pairs(seq, None),
        "attention_kernel": kernel_pairs(seq, w, cfg.attention_block_size)
                            / kernel_pairs(seq, None, cfg.attention_block_size),
        "layer": layer_flops(cfg, seq, w) / layer_flops(cfg, seq, None),
    }


# ---------------------------------------------------------------------------------------------------------------
# the benchmark


def forward(cfg: ModelConfig, *, seq: int, batch: int = 1, repeats: int = 5, layer_seq: int = 16384,
            progress: Progress = None) -> dict:
    """Whole-model tokens/s at `seq`, the M/S attention-time split at `seq`, and S vs M per layer at `layer_seq`."""
    for name, value in (("seq", seq), ("batch", batch), ("repeats", repeats), ("layer_seq", layer_seq)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    letters = cfg.explicit_pattern
    counts = {k.value: letters.count(k.value) for k in KINDS}
    whole = time_model(cfg, seq, batch, repeats, progress)
    layer = layer_params(cfg, jax.random.key(2))
    layers = [time_layer(cfg, kind, length, batch, repeats, layer, progress)
              for length in dict.fromkeys((seq, layer_seq)) for kind in KINDS]
    step = {(row["kind"], row["seq"]): row["step_s"] for row in layers}
    stack = {k: counts[k] * step[(k, seq)] for k in counts}
    attention_s = sum(stack.values())
    return {
        "config": cfg.name, "pattern": letters, "window": cfg.sliding_window, "seq": seq, "batch": batch,
        "repeats": repeats, "layer_seq": layer_seq, "backend": jax.default_backend(),
        "devices": jax.device_count(), "counts": counts, "forward": whole, "layers": layers,
        "split": {
            "attention_s": attention_s,  # the stack's attention layers, timed one by one
            "attention_share_of_forward": attention_s / whole["step_s"],
            "fraction": {k: stack[k] / attention_s for k in stack},
        },
        "ratio": {  # S / M per layer at `layer_seq`
            "seq": layer_seq,
            "measured": step[("S", layer_seq)] / step[("M", layer_seq)],
            "flops": flop_ratios(cfg, layer_seq),
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# the attention-scaling benchmark: one layer of each kind at several lengths

# V4's own window, compression ratios, top-k and per-head widths (deepseek-v4-flash) at 4 of its 64 heads, so that
# one query's costs keep the released proportions at a CPU-affordable size: attention over the window and the
# top-512 entries (4 heads x 512) against the indexer's scan of every visible entry (4 heads x 128), as 64 x 512
# against 64 x 128 in the release; per head 64 model dims, 16 q-LoRA dims and 128 output-LoRA dims (one output
# group: 8 heads per group would not divide 4). M and S get V3's MLA widths (latent 512, nope 128, v 128, rope 64)
# at the same 4 heads. The tiny presets' widths (entry 32, indexer 2 x 16, top-3) would instead let the indexer's
# scan, which grows with the sequence, outweigh the attention it serves. At V4's proportions the scan (prefill
# average) matches the window + top-k attention near 40K tokens and H's entries match its window at 32K: by the
# cost model an ideal layer grows 5.4x (C) and 4.7x (H) from 8K to 32K tokens, the released layers 4.7x and 4.2x
# (wider projections), the attention alone 6.5x and 6.4x. The kernel block is the window.
ATTENTION_SETTINGS = {"sliding_window": 128, "attention_block_size": 128, "csa_compress_ratio": 4,
                      "hca_compress_ratio": 128, "index_topk": 512,
                      "num_attention_heads": 4, "head_dim": 512, "qk_rope_head_dim": 64, "index_n_heads": 4,
                      "index_head_dim": 128, "hidden_size": 256, "q_lora_rank": 64, "o_groups": 1,
                      "o_lora_rank": 512, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "v_head_dim": 128}
# A timing that would spend longer than this on its repeats times fewer of them (at least one).
ATTENTION_BUDGET_S = 60.0
_V4_SIZES = ("head_dim", "o_lora_rank", "q_lora_rank")


def parse_kinds(text: str) -> tuple[AttentionKind, ...]:
    """`"M,S,W"` -> (FULL, SLIDING, WINDOW), duplicates dropped. ValueError naming the bad letter otherwise."""
    kinds = []
    for item in text.split(","):
        letter = item.strip()
        try:
            kinds.append(AttentionKind(letter))
        except ValueError:
            known = ", ".join(f"{k.value} ({k.name.lower()})" for k in AttentionKind)
            raise ValueError(f"unknown attention kind {letter!r} in {text!r}; known: {known}") from None
    return tuple(dict.fromkeys(kinds))


def attention_config(cfg: ModelConfig, kinds, **settings) -> ModelConfig:
    """`cfg` able to build one layer of every kind in `kinds`, with `settings` (ModelConfig fields, such as
    `ATTENTION_SETTINGS`) applied.

    One config serves every kind, so the layers share the model width, heads, rope dims and window. M and S need MLA
    sizes, which V4 presets (tiny-v4) lack: any of `kv_lora_rank`, `qk_nope_head_dim`, `v_head_dim` below 1 is
    derived from the V4 entry width c = `head_dim`: kv_lora_rank = c (an MLA token then caches about what a V4
    token does: c + rope dims vs c), qk_nope_head_dim = v_head_dim = c // 2. For tiny-v4 (c = 32) these are
    tiny-v3's own 32, 16, 16. Sizes in `settings` (ATTENTION_SETTINGS gives V3's) are used as given. W, C and H need V4 sizes (`head_dim`, `o_lora_rank`, ...), which MLA presets lack:
    those raise ValueError rather than guess. The pattern becomes `kinds` repeated over the layers, so the config's
    own validation checks every size the kinds need; nothing in one layer reads the pattern.
    """
    kinds = tuple(AttentionKind(k) for k in kinds)
    if not kinds:
        raise ValueError("no attention kinds given")
    changes = dict(settings)
    if any(k in (AttentionKind.FULL, AttentionKind.SLIDING) for k in kinds):
        width = changes.get("head_dim", cfg.head_dim)
        missing = [f for f in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
                   if getattr(cfg, f) < 1 and f not in changes]
        if missing and width < 2:
            raise ValueError(f"{cfg.name} has no MLA sizes ({', '.join(missing)}) and no V4 head_dim to derive "
                             f"them from; M/S layers need an MLA or V4 preset")
        derived = {"kv_lora_rank": width, "qk_nope_head_dim": width // 2, "v_head_dim": width // 2}
        changes |= {f: derived[f] for f in missing}
    if any(k.is_v4 for k in kinds):
        missing = [f for f in _V4_SIZES if not getattr(cfg, f)]
        if missing:
            raise ValueError(f"{cfg.name} has no V4 attention sizes ({', '.join(missing)}); W/C/H layers need a "
                             f"V4 preset such as tiny-v4")
    layers = max(cfg.num_hidden_layers, len(kinds))
    letters = "".join(k.value for k in kinds)
    changes |= {"pattern": (letters * layers)[:layers], "num_hidden_layers": layers}
    return cfg.replace(**changes)


def flops_ratio(cfg: ModelConfig, kind: AttentionKind, short: int, long: int) -> float:
    """Layer FLOPs at `long` tokens over those at `short` by `cost.attention_flops` (matmuls only, each query's
    ideal key set: visible window, visible compressed entries, the top-k, the indexer's scan of every visible
    entry): the ratio an ideal kernel would show, blocks and softmax aside."""
    return (cost.attention_flops(cfg, kind, long) * long) / (cost.attention_flops(cfg, kind, short) * short)


def _growth(short_s: float, long_s: float, short: int, long: int) -> dict:
    """Time ratio between two lengths next to the ideal linear and quadratic ratios, and a verdict: linear-ish up
    to 1.5x the linear ratio (6 for 4x the tokens), quadratic-ish from the geometric middle of linear and
    quadratic (exponent 1.5: 8 for 4x), super-linear between."""
    measured, linear = long_s / short_s, long / short
    exponent = math.log(measured) / math.log(linear)
    verdict = ("linear-ish" if measured <= 1.5 * linear else "quadratic-ish" if exponent >= 1.5
               else "super-linear")
    return {"from_seq": short, "to_seq": long, "measured": measured, "linear": linear, "quadratic": linear ** 2,
            "exponent": exponent, "verdict": verdict}


def attention(cfg: ModelConfig, kinds, seqs, batch: int = 1, repeats: int = 3, progress: Progress = None,
              budget_s: float | None = ATTENTION_BUDGET_S) -> dict:
    """Forward time of one layer of each kind in `kinds` (letters or AttentionKind) at each length in `seqs`.

    `cfg` is used as given (window, block, ratios, top-k: see `attention_config` and `ATTENTION_SETTINGS` for the
    CLI's) except for MLA sizes derived when M or S is asked for and `cfg` has none. Each kind gets its own random
    parameters and each (kind, length) its own compile, reported apart from the step time; a kind's lengths are
    timed round-robin (`time_layer_lengths`). With two or more lengths, `growth` compares the two longest:
    measured time ratio, `flops_ratio`, the linear and quadratic ratios and a verdict. Timings that would spend
    more than `budget_s` on their repeats take fewer of them (`repeats` in each row says how many).
    """
    kinds = tuple(dict.fromkeys(AttentionKind(k) for k in kinds))
    seqs = sorted(set(seqs))
    if not kinds:
        raise ValueError("no attention kinds given")
    if not seqs:
        raise ValueError("no sequence lengths given")
    for name, value in (("seq", min(seqs)), ("batch", batch), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    cfg = attention_config(cfg, kinds)
    rows = []
    for i, kind in enumerate(kinds):
        _say(progress, f"initialising one {kind.value} layer...")
        params = layer_params(cfg, jax.random.key(3 + i), kind)
        rows += time_layer_lengths(cfg, kind, seqs, batch, repeats, params, progress, budget_s)
    step = {(row["kind"], row["seq"]): row["step_s"] for row in rows}
    growth = {}
    if len(seqs) > 1:
        short, long = seqs[-2:]
        growth = {k.value: _growth(step[(k.value, short)], step[(k.value, long)], short, long)
                  | {"flops": flops_ratio(cfg, k, short, long)} for k in kinds}
    fields = ("hidden_size", "num_attention_heads", "qk_rope_head_dim", "head_dim", "o_groups", "o_lora_rank",
              "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
              *ATTENTION_SETTINGS, "dtype")
    return {
        "config": cfg.name, "settings": {f: getattr(cfg, f) for f in fields}, "kinds": [k.value for k in kinds],
        "seqs": seqs, "batch": batch, "repeats": repeats, "budget_s": budget_s, "backend": jax.default_backend(),
        "devices": jax.device_count(), "layers": rows, "growth": growth,
    }


def attention_markdown(result: dict) -> str:
    r, s, growth = result, result["settings"], result["growth"]
    seqs, kinds = r["seqs"], r["kinds"]
    row = {(x["kind"], x["seq"]): x for x in r["layers"]}
    fewer = [x for x in r["layers"] if x["repeats"] < r["repeats"]]
    header = (f"One attention layer per kind ({r['config']} with hidden {s['hidden_size']}, "
              f"{s['num_attention_heads']} heads, q-LoRA {s['q_lora_rank']}, rope {s['qk_rope_head_dim']}, "
              f"{s['dtype']}): "
              f"window {s['sliding_window']}, block {s['attention_block_size']}")
    if "C" in kinds:
        header += (f", C ratio {s['csa_compress_ratio']} top-{s['index_topk']} "
                   f"(indexer {s['index_n_heads']} heads x {s['index_head_dim']})")
    if "H" in kinds:
        header += f", H ratio {s['hca_compress_ratio']}"
    if any(k in kinds for k in "WCH"):
        header += f", V4 entry {s['head_dim']} (output {s['o_groups']} groups x rank {s['o_lora_rank']})"
    if any(k in kinds for k in "MS"):
        header += f", MLA kv_lora {s['kv_lora_rank']} / nope {s['qk_nope_head_dim']} / v {s['v_head_dim']}"
    out = [header + ".",
           (f"{r['backend']} x{r['devices']}, batch {r['batch']}, median of {r['repeats']} after a warm-up, each "
            f"kind's lengths timed round-robin (compile excluded); ms per layer forward."), ""]
    columns = [f"{t} ms" for t in seqs]
    if growth:
        short, long = seqs[-2:]
        columns += [f"{long}/{short} time", "FLOPs ratio (cost model)", "ideal linear / quadratic"]
    body = []
    for k in kinds:
        cells = [k] + [f"{row[(k, t)]['step_s'] * 1e3:.1f}" + ("*" if row[(k, t)] in fewer else "") for t in seqs]
        if growth:
            g = growth[k]
            cells += [f"{g['measured']:.2f}", f"{g['flops']:.2f}", f"{g['linear']:.3g} / {g['quadratic']:.3g}"]
        body.append(cells)
    out += _table(["kind", *columns], body)
    if fewer:
        out += ["", f"Starred: fewer repeats, since {r['repeats']} would have taken over {r['budget_s']:g} s ("
                + ", ".join(f"{x['kind']} at {x['seq']}: {x['repeats']}" for x in fewer) + ")."]
    if growth:
        short, long = seqs[-2:]
        out += ["", (f"From {short} to {long} tokens ({long / short:g}x; linear-ish: at most "
                     f"{1.5 * long / short:g}x the time):")]
        out += [f"- {k}: {g['measured']:.2f}x the time, exponent {g['exponent']:.2f} -> {g['verdict']}"
                for k, g in growth.items()]
    out += ["", "Compile seconds (not in the times above):", ""]
    out += _table(["kind", *(str(t) for t in seqs)],
                  [[k, *(f"{row[(k, t)]['compile_s']:.1f}" for t in seqs)] for k in kinds])
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(result: dict) -> str:
    r, fwd, split = result, result["forward"], result["split"]
    step = {(row["kind"], row["seq"]): row for row in r["layers"]}
    out = [f"{r['config']} `{r['pattern']}` (window {r['window']}), {r['backend']} x{r['devices']}, "
           f"median of {r['repeats']}", ""]
    out += _table(["batch", "seq", "compile s", "forward ms", "tokens/s"],
                  [[str(r["batch"]), str(r["seq"]), f"{fwd['compile_s']:.1f}", f"{fwd['step_s'] * 1e3:.1f}",
                    f"{fwd['tokens_per_s']:,.0f}"]])
    out += ["", f"Attention time split at seq {r['seq']} (layers timed alone; together "
                f"{split['attention_share_of_forward']:.0%} of the forward):", ""]
    out += _table(["kind", "layers", "ms / layer", "ms all layers", "share of attention"],
                  [[k, str(n), f"{step[(k, r['seq'])]['step_s'] * 1e3:.2f}",
                    f"{n * step[(k, r['seq'])]['step_s'] * 1e3:.2f}", f"{split['fraction'][k]:.1%}"]
                   for k, n in r["counts"].items()])
    ratio, flops = r["ratio"], r["ratio"]["flops"]
    t = ratio["seq"]
    out += ["", f"One S layer vs one M layer at seq {t}:", ""]
    out += _table(["M ms", "S ms", "S/M measured", "S/M attention FLOPs (ideal)", "S/M attention FLOPs (blocked)",
                   "S/M layer FLOPs"],
                  [[f"{step[('M', t)]['step_s'] * 1e3:.1f}", f"{step[('S', t)]['step_s'] * 1e3:.1f}",
                    f"{ratio['measured']:.3f}", f"{flops['attention_ideal']:.4f}",
                    f"{flops['attention_kernel']:.4f}", f"{flops['layer']:.4f}"]])
    measured = ratio["measured"]
    verdict = "well under" if measured < 0.125 else "under" if measured < 0.25 else "NOT under"
    out += ["", f"An S layer at {t} tokens costs {measured:.1%} of an M layer ({verdict} a quarter)."]
    return "\n".join(out)
