"""Forward-pass benchmarks: whole-model tokens/s and the cost of full (`M`) vs sliding-window (`S`) MLA layers.

Legend: b batch, t time, d model, n heads, w window.
`forward(cfg, seq=...)` returns a JSON-able dict; `markdown(result)` renders it. Every timing is the median of
`repeats` runs of an ahead-of-time compiled function after one untimed warm-up run, each ended by
`block_until_ready`; compile time is measured separately. Per-layer times come from one MLA layer built and jitted
on its own (projections + kernel), so they isolate `kernels.blockwise` (M) from `kernels.banded` (S). Timings are
noisy on shared machines: compare ratios from the same run, not absolute numbers across runs.
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

from v4jax import model
from v4jax.attention.mla import MLA
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
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _layer(cfg: ModelConfig, kind: AttentionKind) -> MLA:
    return MLA(cfg, window=None if kind is AttentionKind.FULL else cfg.sliding_window, rngs=nnx.Rngs(0))


def layer_params(cfg: ModelConfig, key: jax.Array) -> nnx.State:
    """Random parameters of one MLA layer, the same for M and S (the window is static, not state).

    Filled by the model's own jitted `fill_random`: one threefry kernel, where building the layer eagerly
    compiles one per parameter shape (seconds each on a busy CPU).
    """
    abstract = nnx.state(nnx.eval_shape(lambda: _layer(cfg, AttentionKind.FULL)))
    return jax.jit(lambda k: fill_random(abstract, k))(key)


def time_layer(cfg: ModelConfig, kind: AttentionKind, seq: int, batch: int, repeats: int,
               params: nnx.State, progress: Progress = None) -> dict:
    """One MLA layer of `kind` on x [b, t, d]: compile s and median step s."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: _layer(cfg, kind)))
    x = _inputs((batch, seq, cfg.hidden_size), 2, dtype=cfg.dtype)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    segment_ids = jnp.zeros((batch, seq), jnp.int32)
    args = (params, x, positions, segment_ids)
    _say(progress, f"compiling one {kind.value} layer (batch {batch}, seq {seq})...")
    compiled, compile_s = compile_timed(lambda s, *rest: nnx.merge(graphdef, s)(*rest), *args)
    _say(progress, f"timing one {kind.value} layer ({repeats} repeats)...")
    return {"kind": kind.value, "seq": seq, "compile_s": compile_s,
            "step_s": median_seconds(compiled, *args, repeats=repeats)}


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
