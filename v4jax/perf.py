"""The performance suite (`python -m train.bench all --out DIR`): v4jax against its peers on one workload, in one
process, with the ratios the performance issue targets.

Workload: `configs/bench_tiny_v4` (MaxText's deepseek4-tiny shapes, float32, AdamW, batch 4 x 512). Measured here:
- the CPU float32 matmul peak (`metrics.measure_cpu_matmul_peak`) at the start; the MFU is taken against the best of
  it and the train benchmark's own before/after measurements (a busy moment must not flatter the MFU);
- v4jax: the train step (`training.bench.train`: tokens/s, cold compile s, MFU), the jitted forward
  (`bench.time_model`: tokens/s) and greedy decode at batch 1 (`serving.bench.decode`: median decode step with
  the cache about full, after a prefill of `context - new_tokens` tokens);
- transformers' `DeepseekV4ForCausalLM` (eager attention, float32, torch threads = CPU cores) on the SAME random
  weights (`model.init(cfg, key(0))`, what the train step starts from, exported with `v4jax.hf.save`): forward
  (no grad, no cache) and train step (AdamW) tokens/s at the same batch, and greedy decode ms/token at batch 1
  measured as `../shared/peers/hf_bench.py` does: (generate(new) - generate(1)) / (new - 1);
- MaxText: only detected (a Python >= 3.12 interpreter that imports `maxtext`); it is never run from here, so its
  entry is `{"skipped": reason}` and the train target is checked against its recorded figure (328 tokens/s,
  `MAXTEXT_RECORDED`).

Every figure is the median of a few timed runs after a warm-up; the machine may be shared, so compare the ratios of
one run, not absolute figures across runs. `quick=True` shrinks the workload (2 layers `CH`, vocab 512, batch
2 x 128, 8 decode steps): about a minute, most of it the train step's compile; its target verdicts mean nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax

from v4jax import bench, cost, hf, model
from v4jax.serving import bench as serving_bench
from v4jax.training import bench as train_bench
from v4jax.training import metrics, overrides
from v4jax.training.config import RunConfig

CONFIG = "bench_tiny_v4"
# The peers' figures from the performance issue (this machine kind, 2 cores, float32).
MAXTEXT_RECORDED = {"train_step_s": 6.2, "train_tokens_per_s": 328.0,
                    "source": "recorded in the performance issue (MaxText 0.2.5, ../shared/peers/run_maxtext.sh)"}
TRANSFORMERS_RECORDED = {"train_step_s": 7.4, "train_tokens_per_s": 275.0, "forward_tokens_per_s": 952.0,
                         "decode_ms_per_token": 62.0}
TARGETS = {"train_vs_maxtext": 4.0, "forward_vs_transformers": 5.0, "decode_ms": 6.0, "decode_vs_transformers": 10.0}
# Row labels of the Markdown table, in order.
ROWS = ("forward tokens/s", "train step tokens/s", "train step tokens/s vs MaxText", "greedy decode ms/token",
        "greedy decode ms/token (absolute)")

FULL = {"train_steps": 5, "train_warmup": 1, "forward_repeats": 3, "hf_repeats": 3, "prompt": 256, "new_tokens": 64}
QUICK = {"train_steps": 2, "train_warmup": 1, "forward_repeats": 2, "hf_repeats": 1, "prompt": 32, "new_tokens": 8}


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
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def transformers_peer(run: RunConfig, params, *, repeats: int, prompt: int, new_tokens: int,
                      progress: Callable[[str], None] | None = None) -> dict:
    """transformers' DeepseekV4ForCausalLM on `params` (exported with `hf.save`): forward and AdamW train step
    tokens/s at the run's batch, greedy decode ms/token at batch 1 (prefill excluded, as hf_bench.py does)."""
    import numpy as np
    import torch
    import transformers

    say = progress or (lambda _: None)
    cfg, batch, seq = run.model, run.train.batch_size, run.train.seq_len
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    say("transformers: exporting the v4jax weights and loading them ...")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(tmp, cfg, params)
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                      attn_implementation="eager")
    n_params = sum(p.numel() for p in reference.parameters())
    rng = np.random.default_rng(2)
    ids = torch.tensor(rng.integers(0, cfg.vocab_size, (batch, seq)), dtype=torch.long)
    out = {"version": transformers.__version__, "torch": torch.__version__, "threads": threads, "dtype": "float32",
           "attention": "eager", "params": n_params,
           "weights": "the v4jax model's (model.init(cfg, key(0)), exported with v4jax.hf.save)"}

    reference.eval()

    def forward():
        with torch.no_grad():
            reference(input_ids=ids, use_cache=False)

    say(f"transformers: forward {batch} x {seq} ({repeats} timed) ...")
    times = _timed(forward, repeats)
    out["forward"] = {"step_s": statistics.median(times), "times_s": times,
                      "tokens_per_s": batch * seq / statistics.median(times)}

    prompt_ids = torch.tensor(rng.integers(0, cfg.vocab_size, (1, prompt)), dtype=torch.long)
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
    opt = torch.optim.AdamW(reference.parameters(), lr=run.train.learning_rate, weight_decay=run.train.weight_decay)

    def train_step():
        opt.zero_grad(set_to_none=True)
        reference(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()

    say(f"transformers: train step (AdamW) {batch} x {seq} ({repeats} timed) ...")
    times = _timed(train_step, repeats)
    out["train"] = {"step_s": statistics.median(times), "times_s": times,
                    "tokens_per_s": batch * seq / statistics.median(times)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the suite


def _target(name: str, value: float, op: str, bound: float, note: str = "") -> dict:
    ok = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": value, "op": op, "target": bound, "pass": bool(ok), "note": note}


def run_all(out_dir: str | os.PathLike, quick: bool = False, progress: Callable[[str], None] | None = print) -> dict:
    """Measure everything (module docstring) in this process; write `out_dir/bench.json` and `out_dir/bench.md`;
    return the results (JSON-able), the Markdown table under "markdown"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _: None)
    sizes = QUICK if quick else FULL
    run = workload(quick)
    cfg, batch, seq = run.model, run.train.batch_size, run.train.seq_len
    started = time.perf_counter()

    say("measuring the CPU float32 matmul peak ...")
    peak_start = metrics.measure_cpu_matmul_peak()

    say(f"v4jax train step: {cfg.name}, {batch} x {seq} ...")
    train = train_bench.train(run, steps=sizes["train_steps"], warmup=sizes["train_warmup"], name=CONFIG,
                              progress=progress)
    peak = max([peak_start, *train["peak_measurements"]])
    mfu = train["flops_per_step"] / train["step_time_s"] / peak

    say(f"v4jax forward: {batch} x {seq} ...")
    forward = bench.time_model(cfg, seq, batch, sizes["forward_repeats"], progress=progress)
    forward["batch"], forward["seq"] = batch, seq

    params = model.init(cfg, jax.random.key(0))  # what the train step starts from (seed 0)
    prompt, new = sizes["prompt"], sizes["new_tokens"]
    say(f"v4jax greedy decode at batch 1: {new} steps after a {prompt}-token prompt ...")
    dec = serving_bench.decode(cfg, [1], [prompt + new], steps=new, chunk=prompt, progress=progress, params=params)
    row = dec["rows"][0]
    decode = {"batch": 1, "prompt": prompt, "new_tokens": new, "decode_step_s": row["decode_step_s"],
              "ms_per_token": 1e3 * row["decode_step_s"], "prefill_s": row["prefill_s"]}

    try:
        peer = transformers_peer(run, params, repeats=sizes["hf_repeats"], prompt=prompt, new_tokens=new,
                                 progress=progress)
    except ImportError as error:
        peer = {"skipped": f"transformers or torch not importable: {error}"}
    del params

    maxtext = maxtext_status()
    say(f"MaxText: skipped: {maxtext['skipped']}" if "skipped" in maxtext else "MaxText: measured")

    ratios = {"train_vs_maxtext": train["tokens_per_s"] / MAXTEXT_RECORDED["train_tokens_per_s"]}
    targets = [_target("train tokens/s >= 4x MaxText", ratios["train_vs_maxtext"], ">=", TARGETS["train_vs_maxtext"],
                       "MaxText's recorded figure (not measured in this run)")]
    targets.append(_target("decode ms/token <= 6", decode["ms_per_token"], "<=", TARGETS["decode_ms"]))
    if "skipped" not in peer:
        ratios["forward_vs_transformers"] = forward["tokens_per_s"] / peer["forward"]["tokens_per_s"]
        ratios["train_vs_transformers"] = train["tokens_per_s"] / peer["train"]["tokens_per_s"]
        ratios["decode_transformers_over_v4jax"] = peer["decode"]["ms_per_token"] / decode["ms_per_token"]
        targets.insert(1, _target("forward tokens/s >= 5x transformers", ratios["forward_vs_transformers"], ">=",
                                  TARGETS["forward_vs_transformers"]))
        targets.append(_target("decode >= 10x faster than transformers", ratios["decode_transformers_over_v4jax"],
                               ">=", TARGETS["decode_vs_transformers"]))
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
                "peak_measurements": [peak_start, *train["peak_measurements"]],
                "peak_source": "float32 1024^3 matmul measured in this process, best of the start and the train "
                               "benchmark's before/after measurements"},
        "v4jax": {"train": {"tokens_per_s": train["tokens_per_s"], "step_time_s": train["step_time_s"],
                            "compile_s": train["compile_s"], "mfu": mfu, "flops_per_step": train["flops_per_step"],
                            "cpu_share": train["cpu_share"], "details": train},
                  "forward": forward, "decode": decode},
        "transformers": peer, "transformers_recorded": TRANSFORMERS_RECORDED,
        "maxtext": maxtext, "maxtext_recorded": MAXTEXT_RECORDED,
        "ratios": ratios, "targets": targets,
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
    unit = " ms" if t["op"] == "<=" else ""
    bound = f"{t['op']} {t['target']:g}{unit}" if unit else f"{t['op']} x{t['target']:g}"
    return bound, "PASS" if t["pass"] else "FAIL"


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

    dec = ours["decode"]
    rows = [
        (ROWS[0], f"{ours['forward']['tokens_per_s']:,.0f}", theirs(("forward", "tokens_per_s"), ",.0f"),
         ratio("forward_vs_transformers"), *_verdict(result, "forward tokens/s >= 5x transformers")),
        (ROWS[1], f"{ours['train']['tokens_per_s']:,.0f}", theirs(("train", "tokens_per_s"), ",.0f"),
         ratio("train_vs_transformers"), "—", "—"),
        (ROWS[2], f"{ours['train']['tokens_per_s']:,.0f}",
         f"MaxText {MAXTEXT_RECORDED['train_tokens_per_s']:.0f} (recorded" + (", not measured)" if "skipped" in mt
                                                                                else ")"),
         ratio("train_vs_maxtext"), *_verdict(result, "train tokens/s >= 4x MaxText")),
        (ROWS[3], f"{dec['ms_per_token']:.2f}", theirs(("decode", "ms_per_token"), ".2f"),
         ratio("decode_transformers_over_v4jax"), *_verdict(result, "decode >= 10x faster than transformers")),
        (ROWS[4], f"{dec['ms_per_token']:.2f}", "—", "—", *_verdict(result, "decode ms/token <= 6")),
    ]
    train = ours["train"]
    lines = [
        f"Performance suite{' (QUICK: shrunk workload, verdicts meaningless)' if result['quick'] else ''}: "
        f"{w['config']}, {w['pattern']} ({len(w['pattern'])} layers), {w['params']:,} parameters, {w['dtype']}, "
        f"batch {w['batch']} x {w['seq']}; decode at batch 1, {dec['new_tokens']} tokens after a {dec['prompt']}-token "
        f"prompt. One process, {result['cpu']['cores']} CPU cores.", "",
        "| figure | v4jax | peer | ratio | target | result |", "|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows), "",
        f"- CPU float32 matmul peak (measured in this run): {result['cpu']['peak_flops'] / 1e9:.1f} GFLOP/s",
        f"- v4jax train step: {train['step_time_s']:.3f} s, MFU {100 * train['mfu']:.1f}% of that peak, cold compile "
        f"{train['compile_s']:.1f} s, CPU share {train['cpu_share']:.2f}",
        f"- v4jax forward: {ours['forward']['step_s']:.3f} s per batch, compile {ours['forward']['compile_s']:.1f} s",
        ("- transformers " + peer["version"] + f" (torch {peer['torch']}, {peer['threads']} threads, eager, float32) "
         f"on the same weights as v4jax (exported with v4jax.hf.save)") if has_peer
        else f"- transformers: skipped: {peer['skipped']}",
        f"- MaxText: skipped: {mt['skipped']}" if "skipped" in mt else "- MaxText: measured",
        f"- the issue's recorded peer figures, for scale: transformers forward {rec['forward_tokens_per_s']:.0f} "
        f"tokens/s, train {rec['train_tokens_per_s']:.0f} tokens/s ({rec['train_step_s']} s/step), decode "
        f"{rec['decode_ms_per_token']:.0f} ms/token; MaxText train {MAXTEXT_RECORDED['train_tokens_per_s']:.0f} "
        f"tokens/s ({MAXTEXT_RECORDED['train_step_s']} s/step); v4jax against them: forward "
        f"x{r['forward_vs_transformers_recorded']:.2f}, train x{r['train_vs_transformers_recorded']:.2f}, decode "
        f"x{r['decode_transformers_recorded_over_v4jax']:.2f} (eager torch suffers most from a busy machine: "
        f"compare with the CPU share above)",
        f"- ratios: v4jax / transformers tokens/s for forward and train, transformers / v4jax ms per token for "
        f"decode; total {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)
