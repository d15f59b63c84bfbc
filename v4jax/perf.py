"""The performance suite (`python -m train.bench all --out DIR`): v4jax against its peers on one workload, with the
ratios and the targets of the performance issue.

Workload: `configs/bench_tiny_v4` (MaxText's deepseek4-tiny shapes, float32, AdamW, batch 4 x 512). Measured here, in
this process unless said otherwise:
- the CPU float32 matmul peak (`metrics.measure_cpu_matmul_peak`) and the memory bandwidth
  (`metrics.measure_memory_bandwidth`: a float32 streaming triad on 256 MiB buffers) at the start; every MFU is
  taken against the best of the peak measurements of the run (the start and each train benchmark's before/after
  ones), the decode bound against the better of two bandwidth measurements (the start and after the decode): a
  busy moment must not flatter a figure;
- v4jax: the train step (`training.bench.train`: tokens/s, cold compile s, MFU), the jitted forward
  (`bench.time_model`: tokens/s) and greedy decode at batch 1 (`serving.bench.decode`: median decode step with
  the cache about full, after a prefill of `context - new_tokens` tokens);
- the decode roofline: the bytes a batch-1 decode step must read (`decode_read_bytes`: cost.py's active weights,
  top-k routed experts only, plus the serving cache's arrays at the measured context) over the measured bandwidth;
  the target is the decode step within 2x of that bound;
- v4jax's train step on two hidden-size-1024 configs, `configs/bench_v4_1024` (V4: `WCHC`, mHC, MoE with a
  hash-routed layer) and `configs/bench_hybrid_1024` (the seed hybrid: full and sliding-window MLA, `MSSSM`), both
  batch 4 x 512: tokens/s, step s, cold compile s and MFU, against the target MFU >= 40%;
- transformers' `DeepseekV4ForCausalLM` (eager attention, float32, torch threads = CPU cores) on the SAME random
  weights (`model.init(cfg, key(0))`, what the train step starts from, exported with `v4jax.hf.save`) and the SAME
  token ids (numpy seeds `FORWARD_SEED`, `PROMPT_SEED`), in a fresh `python -c` subprocess of this interpreter
  that imports no JAX (measured next to a live JAX runtime, torch ran 10-15x slower than alone): forward (no grad,
  no cache) and train step (AdamW) tokens/s at the same batch, and greedy decode ms/token at batch 1 measured as
  `../shared/peers/hf_bench.py` does: (generate(new) - generate(1)) / (new - 1). A failed child is recorded as
  {"skipped": reason, with its last stderr lines};
- MaxText: only detected (a Python >= 3.12 interpreter that imports `maxtext`); it is never run from here, so its
  entry is `{"skipped": reason}` and the train target is checked against its recorded figure (328 tokens/s,
  `MAXTEXT_RECORDED`).

Every figure is the median of a few timed runs after a warm-up; the machine may be shared, so compare the ratios of
one run, not absolute figures across runs (each train row prints its CPU share). `quick=True` shrinks the workloads
(bench_tiny_v4: 2 layers `CH`, vocab 512, batch 2 x 128, 8 decode steps; the 1024 configs: hidden 128, 2 layers,
vocab 512, batch 2 x 128, one timed step): about a minute or two, most of it compiles; its target verdicts mean
nothing.
"""
from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax

from v4jax import bench, cost, hf, model, perf_sparse, profiling
from v4jax.serving import bench as serving_bench
from v4jax.training import bench as train_bench
from v4jax.training import metrics, overrides
from v4jax.training.config import RunConfig

CONFIG = "bench_tiny_v4"
# The peers' figures from the performance issue (this machine kind, 2 cores, float32).
MAXTEXT_RECORDED = {"train_step_s": 6.2, "train_tokens_per_s": 328.0, "compile_s": 33.0,
                    "source": "recorded in the performance issue (MaxText 0.2.5, ../shared/peers/run_maxtext.sh)"}
TRANSFORMERS_RECORDED = {"train_step_s": 7.4, "train_tokens_per_s": 275.0, "forward_tokens_per_s": 952.0,
                         "decode_ms_per_token": 62.0}
TARGETS = {"train_vs_maxtext": 4.0, "forward_vs_transformers": 5.0, "decode_ms": 6.0, "decode_vs_transformers": 10.0,
           "decode_over_bound": 2.0, "mfu_1024": 0.40}
# The hidden-size-1024 train workloads (configs/), each a train row and an MFU target.
CONFIGS_1024 = ("bench_v4_1024", "bench_hybrid_1024")
# Row labels of the Markdown table, in order.
ROWS = ("forward tokens/s", "train step tokens/s", "train step tokens/s vs MaxText", "train step cold compile s",
        "greedy decode ms/token",
        "greedy decode ms/token (absolute)", "greedy decode ms/token vs bandwidth bound",
        *(f"train MFU, hidden 1024: {name}" for name in CONFIGS_1024))

# The peer's token ids: v4jax's forward draws its tokens with numpy seed 1 (`bench.time_model` -> `bench._inputs`),
# its decode prompt with seed 0 (`serving.bench._prompt`); the transformers subprocess draws the same ids.
FORWARD_SEED, PROMPT_SEED = 1, 0
PEER_TIMEOUT_S = 3600.0

FULL = {"train_steps": 5, "train_warmup": 1, "forward_repeats": 3, "hf_repeats": 3, "prompt": 256, "new_tokens": 64,
        "train_steps_1024": 5, "before_after_steps": 3}
QUICK = {"train_steps": 2, "train_warmup": 1, "forward_repeats": 2, "hf_repeats": 1, "prompt": 32, "new_tokens": 8,
         "train_steps_1024": 1, "before_after_steps": 1}


def before(run: RunConfig) -> RunConfig:
    """`run` as the train step ran before the profile-driven fixes (README "Performance"): logits materialised
    for a plain log-softmax (`loss_chunk=0`), 128-query attention blocks, and exact MoE capacity as e x tokens
    buffers (capacity factor e / k: a capacity of every token, the same buffers the exact einsum path built
    before single-expert blocks)."""
    cfg = run.model
    old_model = cfg.replace(attention_block_size=128,
                            capacity_factor=cfg.n_routed_experts / cfg.num_experts_per_tok)
    return RunConfig(old_model, dataclasses.replace(run.train, loss_chunk=0))


def workload(quick: bool = False) -> RunConfig:
    """configs/bench_tiny_v4, or its quick shrink (2 layers `CH`, one hash-routed, vocab 512, batch 2 x 128)."""
    run = overrides.load_config(CONFIG)
    if not quick:
        return run
    cfg = run.model.replace(pattern="CH", num_hidden_layers=2, first_hash_layers=1, vocab_size=512,
                            name="bench-tiny-v4-quick")
    return RunConfig(cfg, dataclasses.replace(run.train, batch_size=2, seq_len=128))


# ---------------------------------------------------------------------------------------------------------------
# MaxText


def _maxtext_candidates() -> list[str]:
    found = [os.environ.get("MAXTEXT_PYTHON", ""), "/tmp/peers/maxtext/bin/python", shutil.which("python3.12") or "",
             shutil.which("python3.13") or "", *sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3"))]
    return list(dict.fromkeys(p for p in found if p and os.path.exists(p)))


def maxtext_status() -> dict:
    """{"skipped": reason}: MaxText is detected, never run from here (it takes minutes per run and its own venv)."""
    looked = _maxtext_candidates()
    for python in looked:
        try:
            probe = subprocess.run([python, "-c", "import sys, maxtext; assert sys.version_info >= (3, 12)"],
                                   capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return {"skipped": f"maxtext is importable by {python}, but this suite does not run it (minutes per run); "
                               f"run ../shared/peers/run_maxtext.sh for a fresh figure; the train target uses the "
                               f"recorded {MAXTEXT_RECORDED['train_tokens_per_s']:.0f} tokens/s",
                    "python": python}
    return {"skipped": f"no Python >= 3.12 interpreter with maxtext importable (looked at: "
                       f"{', '.join(looked) or 'none'}); the train target uses the recorded "
                       f"{MAXTEXT_RECORDED['train_tokens_per_s']:.0f} tokens/s"}


# ---------------------------------------------------------------------------------------------------------------
# transformers


def _timed(fn, repeats: int, warm: int = 1) -> list[float]:
    import time

    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _peer_child() -> None:
    """The transformers measurement, run as `python -c` in a fresh interpreter (`transformers_peer` sends this
    function's source and `_timed`'s): no JAX imported, so no XLA thread pool shares the cores with torch's. The
    spec is JSON in argv[1]; the figures are one JSON line on stdout; progress goes to stderr. Self-contained:
    everything it uses is imported here."""
    import json
    import os
    import statistics
    import sys

    spec = json.loads(sys.argv[1])

    def say(text):
        print(text, file=sys.stderr, flush=True)

    try:
        import numpy as np
        import torch
        import transformers
    except ImportError as error:
        print(json.dumps({"skipped": f"transformers or torch not importable: {error}"}))
        return
    batch, seq, vocab = spec["batch"], spec["seq"], spec["vocab_size"]
    prompt, new_tokens, repeats = spec["prompt"], spec["new_tokens"], spec["repeats"]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()  # its bars would be relayed line by line
    say("transformers: loading the exported v4jax weights ...")
    reference = transformers.AutoModelForCausalLM.from_pretrained(spec["weights"], dtype=torch.float32,
                                                                  attn_implementation="eager")
    n_params = sum(p.numel() for p in reference.parameters())
    # the same ids as v4jax's: bench.time_model's forward tokens and serving.bench's decode prompt
    ids_np = np.random.default_rng(spec["forward_seed"]).integers(0, vocab, (batch, seq), dtype=np.int32)
    prompt_np = np.random.default_rng(spec["prompt_seed"]).integers(0, vocab, (1, prompt), dtype=np.int32)
    ids = torch.tensor(ids_np, dtype=torch.long)
    prompt_ids = torch.tensor(prompt_np, dtype=torch.long)
    out = {"version": transformers.__version__, "torch": torch.__version__, "threads": threads, "dtype": "float32",
           "attention": "eager", "params": n_params, "jax_imported": "jax" in sys.modules,
           "inputs": {"forward_ids_sum": int(ids_np.sum()), "prompt_ids_sum": int(prompt_np.sum())}}

    reference.eval()

    def forward():
        with torch.no_grad():
            reference(input_ids=ids, use_cache=False)

    say(f"transformers: forward {batch} x {seq} ({repeats} timed) ...")
    times = _timed(forward, repeats)
    out["forward"] = {"step_s": statistics.median(times), "times_s": times,
                      "tokens_per_s": batch * seq / statistics.median(times)}

    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n):
        with torch.no_grad():
            reference.generate(prompt_ids, max_new_tokens=n, min_new_tokens=n, **kw)

    say(f"transformers: greedy generate 1 and {new_tokens} tokens after a {prompt}-token prompt ...")
    prefill = statistics.median(_timed(lambda: generate(1), repeats))
    whole = statistics.median(_timed(lambda: generate(new_tokens), repeats))
    out["decode"] = {"batch": 1, "prompt": prompt, "new_tokens": new_tokens, "prefill_s": prefill,
                     "generate_s": whole, "ms_per_token": 1e3 * (whole - prefill) / (new_tokens - 1)}

    reference.train()
    opt = torch.optim.AdamW(reference.parameters(), lr=spec["learning_rate"], weight_decay=spec["weight_decay"])

    def train_step():
        opt.zero_grad(set_to_none=True)
        reference(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()

    say(f"transformers: train step (AdamW) {batch} x {seq} ({repeats} timed) ...")
    times = _timed(train_step, repeats)
    out["train"] = {"step_s": statistics.median(times), "times_s": times,
                    "tokens_per_s": batch * seq / statistics.median(times)}
    print(json.dumps(out), flush=True)


# read once, at import: the file on disk may change while a long suite runs
_PEER_SOURCE = "\n\n".join(inspect.getsource(f) for f in (_timed, _peer_child)) + "\n\n_peer_child()\n"


def _peer_source() -> str:
    """`python -c` text: `_timed` and `_peer_child` as written above, then the call."""
    return _PEER_SOURCE


def _tail(text: str, lines: int = 12) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:]) or "(nothing)"


def transformers_peer(run: RunConfig, params, *, repeats: int, prompt: int, new_tokens: int,
                      progress: Callable[[str], None] | None = None, timeout_s: float = PEER_TIMEOUT_S) -> dict:
    """transformers' DeepseekV4ForCausalLM on `params` (exported here with `hf.save` to a temporary directory),
    measured in a fresh `python -c` subprocess of this interpreter (`_peer_child`): forward and AdamW train step
    tokens/s at the run's batch, greedy decode ms/token at batch 1 (prefill excluded, as hf_bench.py does), on the
    same token ids as v4jax's forward (`FORWARD_SEED`) and decode prompt (`PROMPT_SEED`). The child's progress
    lines are relayed to `progress`. A child that fails, times out or prints no figures gives {"skipped": why},
    with its last stderr lines."""
    import numpy as np

    say = progress or (lambda _: None)
    cfg, batch, seq = run.model, run.train.batch_size, run.train.seq_len
    # what v4jax's forward and decode benchmarks feed: the child must draw the same ids
    ours = {"forward_ids_sum": bench._inputs((batch, seq), FORWARD_SEED, high=cfg.vocab_size),
            "prompt_ids_sum": serving_bench._prompt(1, prompt, cfg.vocab_size, seed=PROMPT_SEED)}
    expect = {k: int(np.asarray(v, np.int64).sum()) for k, v in ours.items()}
    with tempfile.TemporaryDirectory() as tmp:
        say("transformers: exporting the v4jax weights (hf.save) for a fresh subprocess ...")
        hf.save(tmp, cfg, params)
        spec = {"weights": tmp, "batch": batch, "seq": seq, "vocab_size": cfg.vocab_size, "prompt": prompt,
                "new_tokens": new_tokens, "repeats": repeats, "forward_seed": FORWARD_SEED,
                "prompt_seed": PROMPT_SEED, "learning_rate": run.train.learning_rate,
                "weight_decay": run.train.weight_decay}
        command = [sys.executable, "-c", _peer_source(), json.dumps(spec)]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=tempfile.gettempdir())
        out_lines: list[str] = []
        err_lines: list[str] = []

        def relay():  # the child's progress, as it comes
            for line in child.stderr:
                err_lines.append(line.rstrip("\n"))
                say(err_lines[-1])

        readers = [threading.Thread(target=relay, daemon=True),
                   threading.Thread(target=lambda: out_lines.extend(child.stdout), daemon=True)]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # a timeout, or this process interrupted: the child must not outlive the call
            if child.poll() is None:
                child.kill()
                child.wait()
        for reader in readers:
            reader.join(10)
        wall_s = time.perf_counter() - started
        stdout = "".join(out_lines)
    if timed_out:
        return {"skipped": f"the transformers subprocess ran past {timeout_s:.0f} s and was killed; its last "
                           f"stderr lines: {_tail(chr(10).join(err_lines))}"}
    if child.returncode != 0:
        return {"skipped": f"the transformers subprocess ({sys.executable} -c ...) exited with code "
                           f"{child.returncode}; its last stderr lines: {_tail(chr(10).join(err_lines))}"}
    try:
        out = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"skipped": f"the transformers subprocess printed no JSON figures (stdout: {_tail(stdout, 3)}; "
                           f"stderr: {_tail(chr(10).join(err_lines))})"}
    if "skipped" in out:
        return out
    if out["inputs"] != expect:
        return {"skipped": f"the transformers subprocess drew other token ids than v4jax ({out['inputs']} vs "
                           f"{expect}): its figures would not compare"}
    bad = [k for k in ("forward", "train", "decode") for v in out[k].values()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return {"skipped": f"the transformers subprocess gave non-finite figures for {sorted(set(bad))}"}
    out["weights"] = "the v4jax model's (model.init(cfg, key(0)), exported with v4jax.hf.save)"
    out["process"] = (f"a fresh subprocess ({os.path.basename(sys.executable)} -c, this interpreter), JAX "
                      f"{'imported' if out['jax_imported'] else 'not imported'}; {wall_s:.0f} s in all")
    out["wall_s"] = wall_s
    return out


# ---------------------------------------------------------------------------------------------------------------
# the suite


def _target(name: str, value: float, op: str, bound: float, note: str = "", unit: str = "x") -> dict:
    """A target and its verdict; `unit` says how the table shows the bound: "x" a ratio, "ms", "%" a fraction."""
    ok = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": value, "op": op, "target": bound, "pass": bool(ok), "note": note, "unit": unit}


def decode_read_bytes(cfg, context: int, batch: int = 1) -> dict:
    """Bytes one greedy decode step of `batch` rows must read from memory with the cache sized for `context`
    tokens, by part:

    - weights: cost.py's active parameters (`cost.param_breakdown`) x the parameter dtype's size: every attention
      layer's weights (projections, compressor, indexer, sinks), per MoE layer (hash-routed ones too) the router,
      the shared experts and the top-k routed experts (k of E: what one token needs; a dense layer whole), the
      RMSNorm weights, the mHC weights and hyper-head, the output head; of the embedding, only the `batch` rows
      looked up (the whole table when tied: the head reads it). The MTP block is left out (decode does not run it);
    - cache: every array of the serving cache `serving.cache.cache_spec(cfg, batch, context)` (the tree the decode
      benchmark decodes into, shapes only): window rings, full-MLA latents, compressed entries, indexer keys and
      the compressors' float32 pending state; the int32 lengths left out. The whole tree is counted, though a C
      layer's attention reads only its top-k entries (its indexer scans all the index keys).

    Writes (one new cache entry per layer) and activations are not counted: they are a few KiB. Also returns
    "weights_all_experts_bytes": the weights with every routed expert counted, for comparison: what a dispatch
    that runs every expert on a one-token batch (a capacity buffer per expert) would read."""
    import jax.numpy as jnp

    from v4jax.config import AttentionKind, MlpKind
    from v4jax.serving import cache as cache_lib

    size = jnp.dtype(cfg.param_dtype).itemsize
    parts = cost.param_breakdown(cfg)
    rows = batch * cfg.hidden_size if not cfg.tie_word_embeddings else 0
    weights = {
        "head": parts[cost.Part.HEAD].active * size,
        "attention": sum(c.active for k, c in parts.items() if isinstance(k, AttentionKind)) * size,
        "mlp_active": sum(c.active for k, c in parts.items() if isinstance(k, MlpKind)) * size,
        "norms_and_mhc": (parts[cost.Part.NORMS].active + parts[cost.Part.MHC].active) * size,
        "embedding": (parts[cost.Part.EMBED].active + rows) * size,
    }
    n_routed = sum(c.total - c.active for k, c in parts.items() if isinstance(k, MlpKind))
    cache = cache_lib.cache_bytes(cache_lib.cache_spec(cfg, batch, context))
    total = sum(weights.values()) + cache
    return {"batch": batch, "context": context, "param_dtype": cfg.param_dtype, "weights": weights,
            "weights_bytes": sum(weights.values()), "cache_bytes": cache, "bytes": total,
            "weights_all_experts_bytes": sum(weights.values()) + n_routed * size}


def workload_1024(name: str, quick: bool = False) -> RunConfig:
    """`configs/<name>` (bench_v4_1024 or bench_hybrid_1024), or its quick shrink: hidden 128, vocab 512, two
    layers (`CH` / `MS`), batch 2 x 128: it runs the same code paths in seconds and its MFU means nothing."""
    run = overrides.load_config(name)
    if not quick:
        return run
    cfg = run.model
    small = dict(hidden_size=128, vocab_size=512, moe_intermediate_size=64, intermediate_size=256,
                 name=f"{cfg.name}-quick")
    small |= (dict(pattern="CH", num_hidden_layers=2, first_hash_layers=1) if any(k.is_v4 for k in (
        s.attention for s in cfg.layers)) else dict(pattern="MS", num_hidden_layers=2, first_dense_layers=1))
    return RunConfig(cfg.replace(**small), dataclasses.replace(run.train, batch_size=2, seq_len=128))


def _train_figures(train: dict) -> dict:
    return {"tokens_per_s": train["tokens_per_s"], "step_time_s": train["step_time_s"],
            "compile_s": train["compile_s"], "flops_per_step": train["flops_per_step"],
            "cpu_share": train["cpu_share"], "details": train}


def run_all(out_dir: str | os.PathLike, quick: bool = False, progress: Callable[[str], None] | None = print) -> dict:
    """Measure everything (module docstring); write `out_dir/bench.json` and `out_dir/bench.md`; return the results
    (JSON-able), the Markdown table under "markdown"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _: None)
    sizes = QUICK if quick else FULL
    run = workload(quick)
    cfg, batch, seq = run.model, run.train.batch_size, run.train.seq_len
    started = time.perf_counter()

    say("measuring the CPU float32 matmul peak and the memory bandwidth ...")
    peak_start = metrics.measure_cpu_matmul_peak()
    bandwidths = [metrics.measure_memory_bandwidth()]

    say(f"v4jax train step: {cfg.name}, {batch} x {seq} ...")
    train = train_bench.train(run, steps=sizes["train_steps"], warmup=sizes["train_warmup"], name=CONFIG,
                              progress=progress)
    peaks = [peak_start, *train["peak_measurements"]]
    ours = _train_figures(train)

    say(f"v4jax forward: {batch} x {seq} ...")
    forward = bench.time_model(cfg, seq, batch, sizes["forward_repeats"], progress=progress)
    forward["batch"], forward["seq"] = batch, seq

    params = model.init(cfg, jax.random.key(0))  # what the train step starts from (seed 0)
    prompt, new = sizes["prompt"], sizes["new_tokens"]
    say(f"v4jax greedy decode at batch 1: {new} steps after a {prompt}-token prompt ...")
    dec = serving_bench.decode(cfg, [1], [prompt + new], steps=new, chunk=prompt, progress=progress, params=params)
    row = dec["rows"][0]
    bandwidths.append(metrics.measure_memory_bandwidth())
    bandwidth = max(bandwidths)  # a busy moment lowers the bandwidth, so raises the bound: that would flatter us
    reads = decode_read_bytes(cfg, prompt + new)
    reads["cache_bytes_decoded"] = row["cache_bytes"]  # the decode benchmark's real cache: the same, or a bug
    decode = {"batch": 1, "prompt": prompt, "new_tokens": new, "context": prompt + new,
              "decode_step_s": row["decode_step_s"], "ms_per_token": 1e3 * row["decode_step_s"],
              "prefill_s": row["prefill_s"], "read_bytes": reads,
              "bound_ms": 1e3 * reads["bytes"] / bandwidth,
              "bound_all_experts_ms": 1e3 * (reads["weights_all_experts_bytes"] + reads["cache_bytes"]) / bandwidth}
    decode["over_bound"] = decode["ms_per_token"] / decode["bound_ms"]

    peer = transformers_peer(run, params, repeats=sizes["hf_repeats"], prompt=prompt, new_tokens=new,
                             progress=progress)
    if "skipped" in peer:
        say(f"transformers: skipped: {peer['skipped']}")
    del params

    trains_1024 = {}
    for name in CONFIGS_1024:
        run_1024 = workload_1024(name, quick)
        m = run_1024.model
        say(f"v4jax train step at hidden {m.hidden_size}: {name} ({m.explicit_pattern}), "
            f"{run_1024.train.batch_size} x {run_1024.train.seq_len} ...")
        t = train_bench.train(run_1024, steps=sizes["train_steps_1024"], warmup=sizes["train_warmup"], name=name,
                              progress=progress)
        peaks += t["peak_measurements"]
        n_total, n_active = cost.params(m)
        trains_1024[name] = {"model": m.summary(), "pattern": m.explicit_pattern, "hidden": m.hidden_size,
                             "batch": run_1024.train.batch_size, "seq": run_1024.train.seq_len,
                             "params": n_total, "active_params": n_active, **_train_figures(t)}

    say("before / after the profile-driven fixes: the train step both ways, interleaved ...")
    before_after = profiling.compare({"before": before(run), "after": run}, steps=sizes["before_after_steps"],
                                     progress=progress)
    say("sparse scaling per layer kind and the 1M-token cache ...")
    sparse = perf_sparse.run(quick, progress)

    maxtext = maxtext_status()
    say(f"MaxText: skipped: {maxtext['skipped']}" if "skipped" in maxtext else "MaxText: measured")

    peak = max(peaks)  # every MFU of the run against the best peak measured in it
    for figures in (ours, *trains_1024.values()):
        figures["mfu"] = figures["flops_per_step"] / figures["step_time_s"] / peak
    ratios = {"train_vs_maxtext": ours["tokens_per_s"] / MAXTEXT_RECORDED["train_tokens_per_s"]}
    targets = [_target("train tokens/s >= 4x MaxText", ratios["train_vs_maxtext"], ">=", TARGETS["train_vs_maxtext"],
                       "MaxText's recorded figure (not measured in this run)")]
    targets.append(_target("cold compile <= MaxText's", ours["compile_s"], "<=", MAXTEXT_RECORDED["compile_s"],
                           "the tiny train step's lower + compile, against MaxText's recorded 33 s", unit="s"))
    targets.append(_target("decode ms/token <= 6", decode["ms_per_token"], "<=", TARGETS["decode_ms"], unit="ms"))
    targets.append(_target("decode within 2x of the bandwidth bound", decode["over_bound"], "<=",
                           TARGETS["decode_over_bound"], "decode ms / (bytes read / measured bandwidth)"))
    if "skipped" not in peer:
        ratios["forward_vs_transformers"] = forward["tokens_per_s"] / peer["forward"]["tokens_per_s"]
        ratios["train_vs_transformers"] = train["tokens_per_s"] / peer["train"]["tokens_per_s"]
        ratios["decode_transformers_over_v4jax"] = peer["decode"]["ms_per_token"] / decode["ms_per_token"]
        targets.insert(1, _target("forward tokens/s >= 5x transformers", ratios["forward_vs_transformers"], ">=",
                                  TARGETS["forward_vs_transformers"]))
        targets.append(_target("decode >= 10x faster than transformers", ratios["decode_transformers_over_v4jax"],
                               ">=", TARGETS["decode_vs_transformers"]))
    for name, figures in trains_1024.items():
        targets.append(_target(f"train MFU >= 40% at hidden 1024 ({name})", figures["mfu"], ">=",
                               TARGETS["mfu_1024"], unit="%"))
    rec = TRANSFORMERS_RECORDED  # the figures: a cross-check when the machine was busy during this run
    ratios |= {"forward_vs_transformers_recorded": forward["tokens_per_s"] / rec["forward_tokens_per_s"],
               "train_vs_transformers_recorded": train["tokens_per_s"] / rec["train_tokens_per_s"],
               "decode_transformers_recorded_over_v4jax": rec["decode_ms_per_token"] / decode["ms_per_token"]}
    n_params, n_active = cost.params(cfg)
    result = {
        "quick": quick, "seconds": None,
        "workload": {"config": CONFIG, "model": cfg.summary(), "pattern": cfg.explicit_pattern,
                     "batch": batch, "seq": seq, "params": n_params, "active_params": n_active,
                     "optimizer": run.train.optimizer.value, "dtype": run.train.compute_dtype},
        "cpu": {"cores": os.cpu_count(), "peak_flops": peak, "peak_flops_start": peak_start,
                "peak_measurements": peaks,
                "peak_source": "float32 1024^3 matmul measured in this process: the best of the start and every "
                               "train benchmark's before/after measurements",
                "memory_bandwidth": bandwidth, "bandwidth_measurements": bandwidths,
                "bandwidth_source": "metrics.measure_memory_bandwidth: float32 triad x = 1.0001 x + y on 2 x 256 "
                                    "MiB buffers, 3 x 256 MiB per call over the median call, best of 3 rounds; "
                                    "the best of the start and after the decode benchmark",
                # the entry points' malloc setting (train/__init__.py), inherited by the transformers subprocess
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "v4jax": {"train": ours,
                  "forward": forward, "decode": decode,
                  "train_1024": trains_1024},
        "transformers": peer, "transformers_recorded": TRANSFORMERS_RECORDED,
        "maxtext": maxtext, "maxtext_recorded": MAXTEXT_RECORDED,
        "ratios": ratios, "targets": targets, "before_after": before_after, "sparse": sparse,
    }
    result["seconds"] = time.perf_counter() - started
    result["markdown"] = markdown(result)
    for name, text in (("bench.json", json.dumps(result, indent=2) + "\n"), ("bench.md", result["markdown"] + "\n")):
        tmp = out_dir / f"{name}.tmp"  # a killed run leaves the previous results, never half of a file
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return result


# ---------------------------------------------------------------------------------------------------------------
# report


def _verdict(result: dict, name: str) -> tuple[str, str]:
    t = next((t for t in result["targets"] if t["name"] == name), None)
    if t is None:
        return "—", "—"
    unit = t.get("unit", "x")
    bound = {"ms": f"{t['target']:g} ms", "s": f"{t['target']:g} s",
             "%": f"{100 * t['target']:g}%"}.get(unit, f"x{t['target']:g}")
    return f"{t['op']} {bound}", "PASS" if t["pass"] else "FAIL"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.1f} KiB"


def markdown(result: dict) -> str:
    w, ours, peer, r = result["workload"], result["v4jax"], result["transformers"], result["ratios"]
    mt, rec = result["maxtext"], result["transformers_recorded"]
    has_peer = "skipped" not in peer

    def theirs(path, fmt):
        if not has_peer:
            return "skipped"
        value = peer[path[0]][path[1]]
        return "transformers " + format(value, fmt)

    def ratio(key):
        return f"x{r[key]:.2f}" if key in r else "—"

    dec, cpu = ours["decode"], result["cpu"]
    reads = dec["read_bytes"]
    rows = [
        (ROWS[0], f"{ours['forward']['tokens_per_s']:,.0f}", theirs(("forward", "tokens_per_s"), ",.0f"),
         ratio("forward_vs_transformers"), *_verdict(result, "forward tokens/s >= 5x transformers")),
        (ROWS[1], f"{ours['train']['tokens_per_s']:,.0f}", theirs(("train", "tokens_per_s"), ",.0f"),
         ratio("train_vs_transformers"), "—", "—"),
        (ROWS[2], f"{ours['train']['tokens_per_s']:,.0f}",
         f"MaxText {MAXTEXT_RECORDED['train_tokens_per_s']:.0f} (recorded" + (", not measured)" if "skipped" in mt
                                                                                else ")"),
         ratio("train_vs_maxtext"), *_verdict(result, "train tokens/s >= 4x MaxText")),
        (ROWS[3], f"{ours['train']['compile_s']:.1f}", f"MaxText {MAXTEXT_RECORDED['compile_s']:.0f} (recorded)",
         f"x{ours['train']['compile_s'] / MAXTEXT_RECORDED['compile_s']:.2f}",
         *_verdict(result, "cold compile <= MaxText's")),
        (ROWS[4], f"{dec['ms_per_token']:.2f}", theirs(("decode", "ms_per_token"), ".2f"),
         ratio("decode_transformers_over_v4jax"), *_verdict(result, "decode >= 10x faster than transformers")),
        (ROWS[5], f"{dec['ms_per_token']:.2f}", "—", "—", *_verdict(result, "decode ms/token <= 6")),
        (ROWS[6], f"{dec['ms_per_token']:.2f}",
         f"bound {dec['bound_ms']:.2f} ms ({_mib(reads['bytes'])} at {cpu['memory_bandwidth'] / 1e9:.1f} GB/s)",
         f"x{dec['over_bound']:.2f}", *_verdict(result, "decode within 2x of the bandwidth bound")),
    ]
    for label, (name, t) in zip(ROWS[7:], ours["train_1024"].items()):
        rows.append((label, f"MFU {100 * t['mfu']:.1f}% ({t['tokens_per_s']:,.0f} tokens/s)", "—", "—",
                     *_verdict(result, f"train MFU >= 40% at hidden 1024 ({name})")))
    train = ours["train"]
    lines = [
        f"Performance suite{' (QUICK: shrunk workloads, verdicts meaningless)' if result['quick'] else ''}: "
        f"{w['config']}, {w['pattern']} ({len(w['pattern'])} layers), {w['params']:,} parameters, {w['dtype']}, "
        f"batch {w['batch']} x {w['seq']}; decode at batch 1, {dec['new_tokens']} tokens after a {dec['prompt']}-token "
        f"prompt. v4jax in one process, transformers in a fresh subprocess; {cpu['cores']} CPU cores; "
        f"GLIBC_TUNABLES={cpu.get('glibc_tunables') or '(unset)'} for both.", "",
        "| figure | v4jax | peer | ratio | target | result |", "|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows), "",
        f"- measured in this run: CPU float32 matmul peak {cpu['peak_flops'] / 1e9:.1f} GFLOP/s (best of "
        f"{len(cpu['peak_measurements'])}), memory bandwidth {cpu['memory_bandwidth'] / 1e9:.1f} GB/s (triad, best "
        f"of {len(cpu['bandwidth_measurements'])})",
        f"- v4jax train step: {train['step_time_s']:.3f} s, MFU {100 * train['mfu']:.1f}% of that peak, cold compile "
        f"{train['compile_s']:.1f} s, CPU share {train['cpu_share']:.2f}",
        f"- v4jax forward: {ours['forward']['step_s']:.3f} s per batch, compile {ours['forward']['compile_s']:.1f} s",
        f"- decode bound: a step reads {_mib(reads['weights_bytes'])} of weights ({reads['param_dtype']}: head "
        f"{_mib(reads['weights']['head'])}, attention {_mib(reads['weights']['attention'])}, MLPs with the top-k "
        f"routed experts {_mib(reads['weights']['mlp_active'])}, norms + mHC {_mib(reads['weights']['norms_and_mhc'])},"
        f" embedding rows {_mib(reads['weights']['embedding'])}) and the {_mib(reads['cache_bytes'])} cache at "
        f"{reads['context']} tokens; counting every routed expert the bound would be "
        f"{dec['bound_all_experts_ms']:.2f} ms",
    ]
    for name, t in ours["train_1024"].items():
        lines.append(f"- {name}: {t['pattern']} ({len(t['pattern'])} layers, hidden {t['hidden']}), "
                     f"{t['params']:,} parameters ({t['active_params']:,} active), batch {t['batch']} x {t['seq']}: "
                     f"step {t['step_time_s']:.3f} s, {t['flops_per_step'] / 1e9:,.0f} GFLOP/step, "
                     f"MFU {100 * t['mfu']:.1f}%, cold compile {t['compile_s']:.1f} s, CPU share {t['cpu_share']:.2f}")
    lines += [
        ("- transformers " + peer["version"] + f" (torch {peer['torch']}, {peer['threads']} threads, eager, float32) "
         f"on the same weights and token ids as v4jax (exported with v4jax.hf.save), in {peer['process']}")
        if has_peer else f"- transformers: skipped: {peer['skipped']}",
        f"- MaxText: skipped: {mt['skipped']}" if "skipped" in mt else "- MaxText: measured",
        f"- the issue's recorded peer figures, for scale: transformers forward {rec['forward_tokens_per_s']:.0f} "
        f"tokens/s, train {rec['train_tokens_per_s']:.0f} tokens/s ({rec['train_step_s']} s/step), decode "
        f"{rec['decode_ms_per_token']:.0f} ms/token; MaxText train {MAXTEXT_RECORDED['train_tokens_per_s']:.0f} "
        f"tokens/s ({MAXTEXT_RECORDED['train_step_s']} s/step); v4jax against them: forward "
        f"x{r['forward_vs_transformers_recorded']:.2f}, train x{r['train_vs_transformers_recorded']:.2f}, decode "
        f"x{r['decode_transformers_recorded_over_v4jax']:.2f} (compare with the CPU shares above: a busy machine "
        f"lowers every figure)",
        f"- ratios: v4jax / transformers tokens/s for forward and train, transformers / v4jax ms per token for "
        f"decode, v4jax ms per token / the bandwidth bound; total {result['seconds']:.0f} s",
    ]
    ba = result.get("before_after")
    if ba:
        b, a = ba["before"], ba["after"]
        lines += ["", "Before / after the profile-driven fixes (`perf.before`: plain log-softmax over materialised "
                      "logits, 128-query attention blocks, e x tokens MoE buffers), train steps interleaved:", "",
                  "| train step | s/step | tokens/s | vs MaxText (recorded) | cold compile s |", "|---|---|---|---|---|",
                  *(f"| {label} | {x['step_s']:.3f} | {x['tokens_per_s']:,.0f} | "
                    f"x{x['tokens_per_s'] / MAXTEXT_RECORDED['train_tokens_per_s']:.2f} | {x['compile_s']:.1f} |"
                    for label, x in (("before", b), ("after", a))),
                  f"| after / before | x{a['step_s'] / b['step_s']:.2f} | x{a['tokens_per_s'] / b['tokens_per_s']:.2f}"
                  f" | | |"]
    if result.get("sparse"):
        lines += ["", perf_sparse.markdown(result["sparse"])]
    return "\n".join(lines)
