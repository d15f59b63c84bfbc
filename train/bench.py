"""Benchmarks from the command line; the measuring lives in `v4jax.bench`.

    python -m train.bench forward --config tiny-hybrid --seq 4096 [--batch 1] [--repeats 5] [--layer-seq 16384]
                                  [--json out.json]
    python -m train.bench attention --kinds M,S,W,C,H --seq 2048,8192,32768 [--config tiny-v4] [--window 128]
                                    [--topk 64] [--block 128] [--batch 1] [--repeats 3] [--json out.json]

    python -m train.bench train --config bench_cpu [--steps 5] [--warmup 1] [--set key=value ...] [--mesh ...]
                                [--json out.json]

    python -m train.bench decode --config tiny-v4 --batch 1,8 --context 1024,8192 [--steps 16] [--chunk 512]
                                 [--no-transformers] [--json out.json]
    python -m train.bench sample [--batch 1,8,32] [--vocab 129280] [--repeats 20] [--json out.json]

    python -m train.bench moe --impl all --tokens 4096,32768 [--mesh data=2,expert=4] [--hidden 512] [--experts 64]
                              [--topk 6] [--width 256] [--capacity-factor 1.25] [--repeats 3] [--budget 15]
                              [--memory-limit-gib N] [--json out.json]

    python -m train.bench context --config tiny-v4 --seq 32768,131072 [--context 1,8] [--batch 1] [--repeats 2]
                                  [--json out.json]

    python -m train.bench all --out DIR [--quick]

    python -m train.bench profile --config bench_tiny_v4 --out DIR [--depth 3] [--rows 25] [--set key=value ...]
    python -m train.bench compare --config bench_tiny_v4 --a "train.loss_chunk=0" --b "" [--steps 3]

Prints Markdown tables on stdout (progress on stderr).
`forward`: whole-model forward tokens/s, the split of attention time between `M` (full MLA) and `S`
(sliding-window MLA) layers, and one S layer's cost relative to one M layer at `--layer-seq` tokens next to the
FLOP ratios the kernels predict.
`attention`: ms per layer for one layer of each kind at each length, the time ratio between the two longest
lengths next to the ideal linear and quadratic ratios, and a verdict per kind (linear-ish: at most 1.5x the token
ratio). The layers take V4-Flash's per-head widths at 4 heads (entry 512, indexer 4 x 128, top-512), its window
128 and compression ratios 4 / 128, block 128, and V3's MLA widths for M/S (`v4jax.bench.ATTENTION_SETTINGS`, which
say why); the preset supplies the rest (`v4jax.bench.attention_config`).
`train`: step time, tokens/s and MFU of a `configs/` run's train step against the CPU matmul peak measured in the
same run (`v4jax.training.bench`).
`decode`: prefill tokens/s, decode step time and tokens/s and cache bytes per (batch, context), then greedy
generation against transformers' `generate` on the same random weights (`v4jax.serving.bench`).
`sample`: the engine's sampler alone, ms per call at each batch for greedy, temperature, top-k, top-p and a top-k
past the short list (`v4jax.serving.bench.sampling`).
`moe`: the routed-expert dispatch alone, every `moe_impl` (`--impl all`: dense, einsum, ragged, ep_a2a, ep_ragged,
ep_psum) at each token count on the mesh (default data=2,expert=4; on CPU the process gets enough fake devices):
ms per forward and per forward + backward, the ratio to ep_a2a, XLA's per-device temp and total bytes, the dropped
fraction, the all-to-all bytes and a float64 check of the output. On CPU ep_ragged's ragged_all_to_all is emulated
(said in the table); a run that would exceed the memory limit is skipped, one over `--budget` seconds is timed fewer
times (`v4jax.moe.bench`).
`context`: one jitted whole-model forward with the sequence split over the mesh's `context` axis (the `long` rules,
parameters replicated, the logits reduced to their mean inside the jit), per (seq, context): XLA's per-device peak
and temp bytes, ms per forward and tokens/s, and the peak at the smallest context (1) over each row's next to the
ideal, with a verdict per row against the target (5x less at context 8 than at context 1; 5/8 of the ideal
elsewhere). Every length must split over every context size, each shard a multiple of the config's compression
ratios (16 for tiny-v4); on CPU the process gets max(--context) fake devices (`v4jax.attention.context_bench`).
`all`: the performance suite on `configs/bench_tiny_v4` (MaxText's deepseek4-tiny shapes, batch 4 x 512): the CPU
matmul peak and memory bandwidth, v4jax's train step (tokens/s, MFU, cold compile), forward and batch-1 greedy
decode, the decode step against its bandwidth bound (active weights + cache bytes / measured bandwidth), the train
step of two hidden-1024 configs (`configs/bench_v4_1024`, `configs/bench_hybrid_1024`: tokens/s, MFU), transformers
on the same weights and token ids in a fresh subprocess (forward, AdamW train step, decode), MaxText (detected, else
skipped with the reason; its recorded figure is used), the ratios and the issue's targets with pass/fail, the train
step before and after the profile-driven fixes (`perf.before`, interleaved), and the sparse-scaling section (time
and memory per layer kind at 2K-32K tokens, the 1M-token V4-Flash cache against a V3 MLA stack:
`v4jax.perf_sparse`); writes DIR/bench.json and DIR/bench.md. `--quick`: shrunk workloads, about a minute or two
(`v4jax.perf`); a full run takes about 25 minutes on 2 cores.
`profile`: one train step of a `configs/` run under `jax.profiler` (a Perfetto trace in DIR/trace, the step's HLO
in DIR), op time summed per named scope, forward and backward apart (`v4jax.profiling`).
`compare`: two variants of a `configs/` run (`--a`, `--b`: `;`-separated overrides), their train steps
interleaved in one process, median step time and the ratio b / a: what survives a shared machine's noise.
"""

from __future__ import annotations

import json
import math
import os
import sys

MOE_MESH = "data=2,expert=4"
CONTEXT_DEFAULT = "1,8"
MAX_FAKE_DEVICES = 64  # `context`: the most fake CPU devices the process gives itself


def _parser():
    from v4jax.cli import ArgumentParser
    from v4jax.config import PRESETS

    parser = ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fwd = commands.add_parser("forward", help="jitted full-model forward and M vs S attention layers")
    fwd.add_argument("--config", required=True, help=f"a preset: {', '.join(sorted(PRESETS))}")
    fwd.add_argument("--seq", type=int, required=True, help="tokens per sequence for the whole-model forward")
    fwd.add_argument("--batch", type=int, default=1)
    fwd.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
    fwd.add_argument("--layer-seq", type=int, default=16384, help="tokens for the one-layer M vs S comparison")
    fwd.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    from v4jax.bench import ATTENTION_SETTINGS

    att = commands.add_parser("attention", help="one layer of each attention kind at several lengths")
    att.add_argument("--kinds", default="M,S,W,C,H", help="comma-separated layer letters (default M,S,W,C,H)")
    att.add_argument("--seq", required=True, help="comma-separated tokens per sequence, e.g. 2048,8192,32768")
    att.add_argument("--config", default="tiny-v4", help=f"the preset giving the sizes (default tiny-v4): "
                                                          f"{', '.join(sorted(PRESETS))}")
    att.add_argument("--window", type=int, default=ATTENTION_SETTINGS["sliding_window"],
                     help="sliding window of S layers and of every V4 window branch")
    att.add_argument("--topk", type=int, default=ATTENTION_SETTINGS["index_topk"],
                     help="compressed entries each C query attends to")
    att.add_argument("--block", type=int, default=ATTENTION_SETTINGS["attention_block_size"],
                     help="query/key block of the kernels")
    att.add_argument("--batch", type=int, default=1)
    att.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    att.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    dec = commands.add_parser("decode", help="serving: prefill and decode speed, cache bytes, vs transformers")
    dec.add_argument("--config", required=True, help=f"a preset: {', '.join(sorted(PRESETS))}")
    dec.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    dec.add_argument("--context", default="1024,8192", help="comma-separated cache lengths (default 1024,8192)")
    dec.add_argument("--steps", type=int, default=16, help="timed decode steps (the median is reported)")
    dec.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    dec.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    dec.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    smp = commands.add_parser("sample", help="the serving sampler alone: ms per call for each way it samples")
    smp.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    smp.add_argument("--vocab", type=int, default=129_280, help="logits per row (default V4's 129,280)")
    smp.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (the median is reported)")
    smp.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    trn = commands.add_parser("train", help="train step time, tokens/s and MFU of a run in configs/")
    trn.add_argument("--config", required=True, help="a module in configs/ (bench_cpu, tiny_v4, ...)")
    trn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    trn.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    trn.add_argument("--warmup", type=int, default=1, help="untimed steps after the compile")
    trn.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=2,expert=2,tensor=2")
    trn.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    from v4jax.moe import bench as moe_bench

    moe = commands.add_parser("moe", help="routed-expert dispatch: every moe_impl's time and memory on a mesh")
    moe.add_argument("--impl", default="all", help="comma-separated moe impls, or all (default): "
                                                    f"{', '.join(i.value for i in moe_bench.IMPLS)}")
    moe.add_argument("--tokens", default="4096,32768", help="comma-separated token counts (default 4096,32768)")
    moe.add_argument("--mesh", default=MOE_MESH, help=f"mesh axis sizes (default {MOE_MESH})")
    moe.add_argument("--config", default="tiny-v4", help="the preset the rest of the config comes from (default "
                                                         "tiny-v4; its swiglu_limit applies)")
    defaults = moe_bench.DEFAULTS
    moe.add_argument("--hidden", type=int, default=defaults["hidden"], help="model width d")
    moe.add_argument("--experts", type=int, default=defaults["experts"], help="routed experts e")
    moe.add_argument("--topk", type=int, default=defaults["topk"], help="experts per token k")
    moe.add_argument("--width", type=int, default=defaults["width"], help="expert width f")
    moe.add_argument("--capacity-factor", default=str(defaults["capacity_factor"]),
                     help="slots per expert = ceil(cf * tokens * k / e), or exact (nothing dropped)")
    moe.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    moe.add_argument("--budget", type=float, default=moe_bench.BUDGET_S,
                     help="seconds one measurement's repeats may take before it gets fewer")
    moe.add_argument("--memory-limit-gib", type=float, default=None,
                     help="skip a program needing more (all fake CPU devices together; default: half the memory "
                          "available at the start)")
    moe.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    ctx = commands.add_parser("context", help="whole-model forward with the sequence split over the context axis: "
                                              "per-device peak memory and time")
    ctx.add_argument("--config", default="tiny-v4", help=f"a preset (default tiny-v4): {', '.join(sorted(PRESETS))}")
    ctx.add_argument("--seq", required=True, help="comma-separated tokens per sequence, e.g. 32768,131072")
    ctx.add_argument("--context", default=CONTEXT_DEFAULT,
                     help=f"comma-separated context-axis sizes (default {CONTEXT_DEFAULT})")
    ctx.add_argument("--batch", type=int, default=1)
    ctx.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the median is reported)")
    ctx.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    prof = commands.add_parser("profile", help="a train step's jax.profiler trace, op time summed per named scope")
    prof.add_argument("--config", required=True, help="a module in configs/ (bench_tiny_v4, bench_cpu, ...)")
    prof.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    prof.add_argument("--out", required=True, metavar="DIR", help="directory for the trace and the step's HLO")
    prof.add_argument("--depth", type=int, default=3, help="scope levels to group by (default 3)")
    prof.add_argument("--rows", type=int, default=25, help="scopes to print (default 25)")
    prof.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    cmp_ = commands.add_parser("compare", help="two variants of a run's train step, timed interleaved")
    cmp_.add_argument("--config", required=True, help="a module in configs/")
    cmp_.add_argument("--a", default="", metavar="K=V;K=V", help="overrides of variant a (';'-separated)")
    cmp_.add_argument("--b", default="", metavar="K=V;K=V", help="overrides of variant b (';'-separated)")
    cmp_.add_argument("--steps", type=int, default=3, help="timed steps per variant (the median is reported)")
    cmp_.add_argument("--json", metavar="PATH", help="also write the results as JSON")

    suite = commands.add_parser("all", help="the performance suite: v4jax vs transformers (and MaxText) on "
                                            "configs/bench_tiny_v4, ratios and targets")
    suite.add_argument("--out", required=True, metavar="DIR", help="directory for bench.json and bench.md")
    suite.add_argument("--quick", action="store_true",
                       help="shrunk workloads (about a minute or two; verdicts meaningless)")
    return parser


def _mesh_sizes(text: str) -> dict[str, int]:
    """`"data=2,expert=4"` -> {"data": 2, "expert": 4}; ValueError naming the bad part."""
    from v4jax.sharding import MESH_AXES

    sizes = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: expected axis=size with a size >= 1, got {part!r}")
        if name.strip() not in MESH_AXES:
            raise ValueError(f"--mesh: unknown axis {name.strip()!r}; known: {', '.join(MESH_AXES)}")
        sizes[name.strip()] = int(value)
    return sizes


def _option(argv: list[str], flag: str, default: str) -> str:
    """The last value given for `flag` (`--flag V` or `--flag=V`) in raw argv, before parsing."""
    value = default
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _host_devices(argv: list[str], default_mesh: str = "", minimum: int = 1) -> None:
    """Before jax is imported: give the CPU platform as many (fake) devices as the --mesh asks for (`moe`: at least
    8), unless XLA_FLAGS already sets a count. Only the host platform reads the flag."""
    if "jax" in sys.modules or "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    mesh = _option(argv, "--mesh", default_mesh)
    sizes = dict(part.partition("=")[::2] for part in mesh.split(",") if part.strip())
    count = max(minimum, math.prod(int(v) for v in sizes.values() if v.strip().isdigit() and int(v) > 0))
    if count > 1:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                            f"--xla_force_host_platform_device_count={count}"]).strip()


def _context_devices(argv: list[str]) -> int:
    """The largest --context size asked for (the default's if absent or unreadable), at most MAX_FAKE_DEVICES: the
    fake CPU devices `context` gives itself. Bad values are reported after parsing."""
    text = _option(argv, "--context", CONTEXT_DEFAULT)
    sizes = [int(v) for v in text.split(",") if v.strip().isdigit()]
    return min(MAX_FAKE_DEVICES, max(sizes, default=1))


def _lengths(parser, text: str, flag: str = "--seq") -> list[int]:
    try:
        seqs = [int(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    bad = [t for t in seqs if t < 1]
    if bad:
        parser.error(f"{flag} lengths must be >= 1, got {bad[0]}")
    return seqs


def _attention(parser, args) -> int:
    from v4jax import bench, config

    try:
        kinds = bench.parse_kinds(args.kinds)
    except ValueError as e:
        parser.error(f"--kinds: {e}")
    seqs = _lengths(parser, args.seq)
    for name in ("window", "topk", "block", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    settings = bench.ATTENTION_SETTINGS | {"sliding_window": args.window, "index_topk": args.topk,
                                           "attention_block_size": args.block}
    try:
        cfg = bench.attention_config(config.preset(args.config), kinds, **settings)
    except ValueError as e:
        parser.error(str(e))
    result = bench.attention(cfg, kinds, seqs, batch=args.batch, repeats=args.repeats,
                             progress=bench.stderr_progress)
    print(bench.attention_markdown(result))
    _write_json(args.json, result)
    return 0


def _decode(parser, args) -> int:
    from v4jax import bench, config
    from v4jax.serving import bench as serving_bench

    batches, contexts = _lengths(parser, args.batch, "--batch"), _lengths(parser, args.context, "--context")
    if args.steps < 1 or args.chunk < 1:
        parser.error(f"--steps and --chunk must be >= 1, got {args.steps} and {args.chunk}")
    if min(contexts) <= args.steps:
        parser.error(f"--context must exceed --steps ({args.steps}), got {min(contexts)}")
    cfg = config.preset(args.config)
    result = serving_bench.decode(cfg, batches, contexts, steps=args.steps, chunk=args.chunk,
                                  progress=bench.stderr_progress)
    versus = None if args.no_transformers else serving_bench.versus_transformers(cfg, progress=bench.stderr_progress)
    print(serving_bench.markdown(result, versus))
    _write_json(args.json, {"decode": result, "versus_transformers": versus})
    return 0


def _sample(parser, args) -> int:
    from v4jax import bench
    from v4jax.serving import bench as serving_bench

    batches = _lengths(parser, args.batch, "--batch")
    if args.vocab < 1 or args.repeats < 1:
        parser.error(f"--vocab and --repeats must be >= 1, got {args.vocab} and {args.repeats}")
    result = serving_bench.sampling(batches, args.vocab, repeats=args.repeats, progress=bench.stderr_progress)
    print(serving_bench.sampling_markdown(result))
    _write_json(args.json, result)
    return 0


def _train(parser, args) -> int:
    from v4jax import bench, sharding
    from v4jax.training import bench as train_bench
    from v4jax.training import loop, overrides

    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    try:
        run = overrides.apply(overrides.load_config(args.config), args.set)
        sizes = _mesh_sizes(args.mesh)
        mesh = sharding.make_mesh(**sizes) if sizes else None
        dataset = loop.make_dataset(run)
    except (ValueError, TypeError, OSError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))
    result = train_bench.train(run, steps=args.steps, warmup=args.warmup, mesh=mesh, name=args.config,
                               dataset=dataset, progress=bench.stderr_progress)
    print(train_bench.text(result))
    _write_json(args.json, result)
    return 0


def _parsed(parser, flag: str, parse, text: str):
    try:
        return parse(text)
    except ValueError as e:
        parser.error(f"{flag}: {e}")


def _moe(parser, args) -> int:
    import jax

    from v4jax import bench, sharding
    from v4jax.moe import bench as moe_bench

    impls = _parsed(parser, "--impl", moe_bench.parse_impls, args.impl)
    capacity_factor = _parsed(parser, "--capacity-factor", moe_bench.parse_capacity, args.capacity_factor)
    try:
        sizes = _mesh_sizes(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    tokens = _lengths(parser, args.tokens, "--tokens")
    for name in ("hidden", "experts", "topk", "width", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.memory_limit_gib is not None and not args.memory_limit_gib > 0:
        parser.error(f"--memory-limit-gib must be > 0, got {args.memory_limit_gib}")
    try:
        cfg = moe_bench.moe_config(hidden=args.hidden, experts=args.experts, topk=args.topk, width=args.width,
                                   capacity_factor=capacity_factor, base=args.config)
        mesh = sharding.make_mesh(**sizes)
    except ValueError as e:
        parser.error(str(e))
    expert_shards = dict(mesh.shape)["expert"]
    if cfg.n_routed_experts % expert_shards:
        parser.error(f"--experts {cfg.n_routed_experts} do not split over the mesh's expert axis of size "
                     f"{expert_shards}")
    rows = moe_bench.batch_rows(mesh)
    bad = [n for n in tokens if n % rows]
    if bad:
        parser.error(f"--tokens must be multiples of {rows} (one batch row per data x fsdp x expert shard), got "
                     f"{bad[0]}")
    limit = None if args.memory_limit_gib is None else int(args.memory_limit_gib * 2**30)
    bench.stderr_progress(f"{jax.default_backend()} x{jax.device_count()}, mesh {args.mesh}; {len(impls)} impls x "
                          f"{len(tokens)} token counts")
    result = moe_bench.moe(cfg, impls, tokens, mesh, repeats=args.repeats, budget_s=args.budget,
                           memory_limit_bytes=limit, progress=bench.stderr_progress)
    print(moe_bench.markdown(result))
    _write_json(args.json, result)
    return 0


def _context(parser, args) -> int:
    import jax

    from v4jax import bench, cli, config, model
    from v4jax.attention import context_bench

    seqs = _lengths(parser, args.seq)
    try:
        contexts = [int(item) for item in args.context.split(",")]
    except ValueError:
        parser.error(f"--context must be comma-separated integers, got {args.context!r}")
    if min(contexts) < 1:
        parser.error(f"--context sizes must be >= 1, got {min(contexts)}")
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    backend, devices = jax.default_backend(), jax.device_count()
    too_many = [c for c in contexts if c > devices]
    if too_many:
        where = f" (at most {MAX_FAKE_DEVICES} fake CPU devices)" if backend == "cpu" else ""
        parser.error(f"--context {too_many[0]} needs {too_many[0]} devices, {backend} has {devices}{where}")
    cfg = config.preset(args.config)
    try:
        context_bench.check(cfg, seqs, contexts)
    except ValueError as e:
        parser.error(f"--seq/--context: {e}")
    copies = max(contexts) if backend == "cpu" else 1  # replicated parameters, once per fake device
    param_bytes = model.param_counts(cfg, include_mtp=True)[0] * 4 * copies
    if param_bytes > cli.memory_bytes() // 2:
        parser.error(f"preset {args.config!r} needs {param_bytes / 2**30:.0f} GiB of float32 parameters "
                     f"({copies} replicas), more than half of this machine's {cli.memory_bytes() / 2**30:.0f} GiB; "
                     f"benchmark a smaller preset")
    bench.stderr_progress(f"{backend} x{devices}; {args.config}, seq {', '.join(map(str, sorted(set(seqs))))} x "
                          f"context {', '.join(map(str, sorted(set(contexts))))}")
    result = context_bench.context(cfg, seqs, contexts, batch=args.batch, repeats=args.repeats,
                                   progress=bench.stderr_progress)
    print(context_bench.markdown(result))
    _write_json(args.json, result)
    return 0


def _runs(parser, args, variants: dict[str, list[str]]):
    from v4jax.training import overrides

    try:
        base = overrides.load_config(args.config)
        return {label: overrides.apply(base, assignments) for label, assignments in variants.items()}
    except (ValueError, TypeError, OSError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))


def _profile(parser, args) -> int:
    from v4jax import bench, profiling

    if args.depth < 1 or args.rows < 1:
        parser.error(f"--depth and --rows must be >= 1, got {args.depth} and {args.rows}")
    run = _runs(parser, args, {"run": args.set})["run"]
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out!r}: {e.strerror or e}")
    result = profiling.profile_train_step(run, args.out, depth=args.depth, name=args.config,
                                          progress=bench.stderr_progress)
    print(profiling.profile_markdown(result, args.rows))
    _write_json(args.json, result)
    return 0


def _compare(parser, args) -> int:
    from v4jax import bench, profiling

    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    split = {label: [x.strip() for x in text.split(";") if x.strip()] for label, text in (("a", args.a),
                                                                                          ("b", args.b))}
    result = profiling.compare(_runs(parser, args, split), steps=args.steps, progress=bench.stderr_progress)
    print("| variant | overrides | s/step | tokens/s | vs a | compile s |\n|---|---|---|---|---|---|")
    for label, r in result.items():
        print(f"| {label} | {'; '.join(split[label]) or '(none)'} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"x{r['vs_first']:.3f} | {r['compile_s']:.1f} |")
    _write_json(args.json, result)
    return 0


def _all(parser, args) -> int:
    from v4jax import bench, perf

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out!r} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out!r}: {e.strerror or e}")
    if not os.access(out, os.W_OK):
        parser.error(f"--out {args.out!r} is not writable")
    result = perf.run_all(out, quick=args.quick, progress=bench.stderr_progress)
    print(result["markdown"])
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "moe":
        _host_devices(argv, MOE_MESH, minimum=8)
    elif argv and argv[0] == "train":
        _host_devices(argv)
    elif argv and argv[0] == "context":
        _host_devices([], f"context={_context_devices(argv)}")
    from v4jax import bench, cli, config, model

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # --config names a run in configs/, not a preset
        return _train(parser, args)
    if args.command == "all":
        return _all(parser, args)
    if args.command == "profile":
        return _profile(parser, args)
    if args.command == "compare":
        return _compare(parser, args)
    if args.command == "sample":
        return _sample(parser, args)
    if args.config not in config.PRESETS:
        parser.error(f"unknown preset {args.config!r}; known: {', '.join(sorted(config.PRESETS))}")
    if args.command == "attention":
        return _attention(parser, args)
    if args.command == "decode":
        return _decode(parser, args)
    if args.command == "moe":
        return _moe(parser, args)
    if args.command == "context":
        return _context(parser, args)
    for name in ("seq", "batch", "repeats", "layer_seq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg = config.preset(args.config)
    param_bytes = model.param_counts(cfg, include_mtp=True)[0] * 4
    if param_bytes > cli.memory_bytes() // 2:
        parser.error(f"preset {args.config!r} has {param_bytes / 2**30:.0f} GiB of float32 parameters, more than "
                     f"half of this machine's {cli.memory_bytes() / 2**30:.0f} GiB; benchmark a smaller preset")
    result = bench.forward(cfg, seq=args.seq, batch=args.batch, repeats=args.repeats, layer_seq=args.layer_seq,
                           progress=bench.stderr_progress)
    print(bench.markdown(result))
    _write_json(args.json, result)
    return 0


if __name__ == "__main__":
    from train import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
