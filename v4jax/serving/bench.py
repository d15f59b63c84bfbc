"""Serving benchmark: prefill tokens/s, decode tokens/s and cache bytes per (batch, context), and our greedy
generation against `transformers`' `generate` on the same random tiny model in the same run.

`decode(cfg, batches, contexts)` and `versus_transformers(cfg, ...)` return JSON-able dicts; `markdown(...)`
renders them. Each (batch, context) gets one warm-up (compiles the prefill chunk and the decode step for that
cache shape), then a timed prefill of `context - steps` prompt tokens and `steps` timed decode steps, whose median
is the step time: the cache is full to about `context` while it decodes. `sampling(batches, vocab)` times the
engine's sampler alone (`sampling_markdown` renders it). Timings on shared machines are noisy; compare ratios
within one run.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from v4jax import hf, model
from v4jax.bench import Progress, _say, median_seconds
from v4jax.config import ModelConfig
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode as steps_lib
from v4jax.serving import sampling as sampling_lib
from v4jax.serving.sampling import greedy_jit


def _prompt(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def _run(cfg, params, batch, context, prompt, steps, chunk):
    """Prefill then `steps` greedy decode steps on a fresh cache: (prefill s, per-step s, cache)."""
    cache = cache_lib.init_cache(cfg, batch, context)
    counts = np.full(batch, prompt.shape[1], np.int32)
    start = time.perf_counter()
    logits, cache = steps_lib.prefill(cfg, params, cache, prompt, counts, chunk=chunk)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    active = np.ones(batch, bool)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, cache = steps_lib.decode_step(cfg, params, cache, np.asarray(greedy_jit(logits)), active)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    return prefill_s, times, cache


def decode(cfg: ModelConfig, batches, contexts, steps: int = 16, chunk: int = 512, progress: Progress = None,
           params=None) -> dict:
    params = model.init(cfg, jax.random.key(0)) if params is None else params
    rows = []
    for context in contexts:
        if context <= steps:
            raise ValueError(f"context {context} must exceed the {steps} decode steps")
        for batch in batches:
            prompt = _prompt(batch, context - steps, cfg.vocab_size)
            _say(progress, f"warm-up (compiles) batch {batch}, context {context}...")
            _run(cfg, params, batch, context, prompt[:, :min(chunk, prompt.shape[1])], 2, chunk)
            _say(progress, f"timing batch {batch}, context {context}: prefill {prompt.shape[1]} tokens, "
                           f"{steps} decode steps...")
            prefill_s, times, cache = _run(cfg, params, batch, context, prompt, steps, chunk)
            step_s = statistics.median(times)
            rows.append({"batch": batch, "context": context, "prefill_tokens": int(prompt.size),
                         "prefill_s": prefill_s, "prefill_tokens_per_s": prompt.size / prefill_s,
                         "decode_step_s": step_s, "decode_tokens_per_s": batch / step_s,
                         "cache_bytes": cache_lib.cache_bytes(cache)})
    return {"config": cfg.name, "pattern": cfg.pattern, "steps": steps, "chunk": chunk, "rows": rows,
            "growth": _growth(rows, contexts)}


def _growth(rows, contexts) -> list[dict]:
    """Decode step time at the longest context over the shortest, per batch, next to the context ratio."""
    if len(contexts) < 2:
        return []
    short, long = min(contexts), max(contexts)
    by = {(r["batch"], r["context"]): r["decode_step_s"] for r in rows}
    return [{"batch": b, "from": short, "to": long, "time_ratio": by[(b, long)] / by[(b, short)],
             "context_ratio": long / short} for b in sorted({r["batch"] for r in rows})]


def versus_transformers(cfg: ModelConfig, prompt_len: int = 128, new_tokens: int = 32, progress: Progress = None,
                        params=None) -> dict:
    """Greedy generation of `new_tokens` after a `prompt_len` prompt (batch 1) by transformers' `generate` and by
    our prefill + decode steps, on the same random weights (exported with `hf.save`). Times exclude our compile
    (one warm-up run) and transformers' first call (also warmed up)."""
    import torch
    import transformers

    params = model.init(cfg, jax.random.key(0)) if params is None else params
    prompt = _prompt(1, prompt_len, cfg.vocab_size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(tmp, cfg, params)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompt, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            return reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)

    _say(progress, "transformers generate (warm-up, then timed)...")
    theirs()
    start = time.perf_counter()
    their_tokens = theirs()[0, prompt_len:].tolist()
    their_s = time.perf_counter() - start

    context = prompt_len + new_tokens
    _say(progress, "v4jax prefill + decode (warm-up, then timed)...")
    _generate(cfg, params, prompt, context, new_tokens)
    start = time.perf_counter()
    our_tokens = _generate(cfg, params, prompt, context, new_tokens)
    our_s = time.perf_counter() - start
    agree = next((i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), new_tokens)
    return {"config": cfg.name, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "transformers_s": their_s, "v4jax_s": our_s, "speedup": their_s / our_s,
            "transformers_version": transformers.__version__, "tokens_agree_for": agree}


def _generate(cfg, params, prompt, context, new_tokens) -> list[int]:
    cache = cache_lib.init_cache(cfg, 1, context)
    logits, cache = steps_lib.prefill(cfg, params, cache, prompt, np.array([prompt.shape[1]]),
                                      chunk=prompt.shape[1])
    out = []
    for _ in range(new_tokens):
        token = np.asarray(greedy_jit(logits))
        out.append(int(token[0]))
        logits, cache = steps_lib.decode_step(cfg, params, cache, token, np.ones(1, bool))
    return out


def markdown(result: dict, versus: dict | None = None) -> str:
    lines = [(f"{result['config']} ({result['pattern']}), greedy decode after a prefill in chunks of "
             f"{result['chunk']}; decode step = median of {result['steps']} steps with the cache about full."), "",
             "| batch | context | prefill tok/s | decode step ms | decode tok/s | cache MiB |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['prefill_tokens_per_s']:,.0f} | "
                     f"{1e3 * r['decode_step_s']:.2f} | {r['decode_tokens_per_s']:,.1f} | "
                     f"{r['cache_bytes'] / 2**20:.2f} |")
    for g in result["growth"]:
        lines.append(f"\nbatch {g['batch']}: decode step time x{g['time_ratio']:.2f} from context {g['from']} to "
                     f"{g['to']} (x{g['context_ratio']:.0f} the context)")
    if versus:
        lines.append(f"\nvs transformers {versus['transformers_version']} generate (batch 1, prompt "
                     f"{versus['prompt_len']}, {versus['new_tokens']} new tokens, greedy): transformers "
                     f"{versus['transformers_s']:.2f} s, v4jax {versus['v4jax_s']:.2f} s -> "
                     f"x{versus['speedup']:.1f}; the two agree on the first {versus['tokens_agree_for']} tokens")
    return "\n".join(lines)


# The sampler's settings per benchmark column: (temperature, top_k, top_p). Each exercises one way of
# `sampling.sample`: greedy, unfiltered, the top-k short list, the thresholds (top-p alone, a top-k past the list).
SAMPLING_MODES = {"greedy": (0.0, 0, 1.0), "temperature 0.7": (0.7, 0, 1.0), "top-k 50": (0.7, 50, 1.0),
                  "top-k 50, top-p 0.9": (0.7, 50, 0.9), "top-p 0.9": (0.7, 0, 0.9), "top-k 2000": (0.7, 2000, 1.0)}


def sampling(batches, vocab: int, repeats: int = 20, progress: Progress = None) -> dict:
    """ms per `sampling.sample_jit` call on float32 [batch, vocab] logits (normal x 3, seeded) for every batch and
    `SAMPLING_MODES` entry: the median of `repeats` calls after three warm-up calls (compile, first touch). Checks on
    the way that greedy rows are the argmax and every token lies in the vocabulary (RuntimeError otherwise)."""
    rows = []
    for batch in batches:
        logits = jax.device_put(np.random.default_rng(batch).standard_normal((batch, vocab)).astype(np.float32) * 3)
        seeds, steps = np.arange(batch, dtype=np.uint32), np.zeros(batch, np.int32)
        row = {"batch": batch, "vocab": vocab, "ms": {}}
        for mode, (temperature, top_k, top_p) in SAMPLING_MODES.items():
            _say(progress, f"sampler: batch {batch}, {mode} ({repeats} calls)...")
            settings = (np.full(batch, temperature, np.float32), np.full(batch, top_k, np.int32),
                        np.full(batch, top_p, np.float32))
            call = lambda: jax.block_until_ready(sampling_lib.sample_jit(logits, seeds, steps, *settings))
            tokens = np.asarray(call())
            call()
            row["ms"][mode] = 1e3 * median_seconds(call, repeats=repeats)  # after a third warm-up call
            if not ((tokens >= 0) & (tokens < vocab)).all() or (
                    temperature == 0 and not (tokens == np.argmax(np.asarray(logits), -1)).all()):
                raise RuntimeError(f"sampler bench: wrong tokens for {mode} at batch {batch}: {tokens.tolist()}")
        rows.append(row)
    return {"vocab": vocab, "repeats": repeats, "modes": list(SAMPLING_MODES), "rows": rows}


def sampling_markdown(result: dict) -> str:
    modes = result["modes"]
    lines = [f"`sampling.sample` on float32 logits of {result['vocab']:,} entries per row, ms per call (median of "
             f"{result['repeats']}; every row of a call with the same settings; temperature 0.7 where sampled).", "",
             "| batch | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r['ms'][m]:.2f}" for m in modes) + " |")
    return "\n".join(lines)
