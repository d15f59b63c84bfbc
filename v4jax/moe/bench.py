"""Routed-expert dispatch benchmark: every `moe_impl` of `moe/dispatch.py` on the same layer, the same tokens and
the same mesh; ms per forward and per forward + backward, per-device memory, drops and all-to-all bytes.

    python -m train.bench moe --impl all --tokens 4096,32768 [--mesh data=2,expert=4] [--hidden 512] [--experts 64]
                              [--topk 6] [--width 256] [--capacity-factor 1.25] [--repeats 3] [--json out.json]

Legend: b batch, t time, n tokens (b*t), d model, e experts, f expert width, k top-k.

What is timed: `dispatch.routed(cfg, ffn, x [b,t,d], weights [b,t,k], indices [b,t,k])` alone (no router, no
shared expert), ahead-of-time compiled under the mesh (`jax.set_mesh`), on inputs placed as the model places them
(tokens split over the rules' batch axes, one batch row per data x fsdp x expert shard; expert weights over
`expert`). `forward` returns the layer's output; `fwd+bwd` is the value and gradient of 0.5 * sum(y^2) with respect
to x, the routing weights and the three expert weight stacks. The impls of one token count are compiled first, then
timed round-robin (`time_runs`, by `v4jax.bench.interleaved_runs`: a warm-up call each, whose outputs give the
dropped fraction, the a2a bytes and the check, then `repeats` rounds), so a change in the machine's load hits all of
them alike; the median is reported. A run whose `repeats` calls would exceed `budget_s` gets fewer (at least one),
and one whose warm-up alone exceeded it reports that call (no warm-up before it) rather than running again.

Per-device memory is XLA's own account of the compiled SPMD program (`compiled.memory_analysis()`): temp is the
scratch the program allocates, total = arguments + outputs + temp - aliased, for one device's partition. A program
whose total would not fit in `memory_limit_bytes` (summed over the devices where they are fake CPU devices sharing
this process's memory) is compiled but not run.

Inputs are random: x ~ N(0, 1); the router draws logits ~ N(0, 1) plus a per-expert N(0, ROUTER_BIAS_STD) bias
(mildly unbalanced loads: the busiest expert gets about 1.5x the mean), takes its top-k and softmaxes the k logits
into weights. The check column compares each impl's y, on `CHECK_TOKENS` sampled tokens none of whose assignments
it dropped, to the same SwiGLU experts evaluated in float64 with numpy: max |y - reference|.

`dense` (every expert on every token) materialises [n, e, f] activations and does e/k times the routed FLOPs; it is
skipped, before compiling, where one such float32 array would reach `DENSE_LIMIT_BYTES`. On XLA:CPU `ragged`
(ragged_dot) is known to run 30-90x slower than `einsum`, and `ep_ragged` exchanges padded chunks with all_to_all
because XLA:CPU has no ragged_all_to_all (`dispatch.ragged_all_to_all_supported`): its a2a bytes are the rows a real
ragged_all_to_all would move, its time that of the emulation. Fake CPU devices share the host's cores, so CPU times
measure the total work of all shards plus the collectives' copies, not a parallel speedup.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from v4jax.bench import Progress, _say, _table, compile_timed, interleaved_runs
from v4jax.cli import memory_bytes
from v4jax.config import ModelConfig, MoeImpl, preset
from v4jax.moe import dispatch
from v4jax.moe.dispatch import FFN
from v4jax.sharding import Axis, MeshAxis, get_rules, logical_to_spec

IMPLS = (MoeImpl.DENSE, MoeImpl.EINSUM, MoeImpl.RAGGED, MoeImpl.EP_A2A, MoeImpl.EP_RAGGED, MoeImpl.EP_PSUM)
# A scaled-down V4-Flash MoE layer (4096 wide, 256 experts, top-6, width 2048 in the release).
DEFAULTS = {"hidden": 512, "experts": 64, "topk": 6, "width": 256, "capacity_factor": 1.25}
DENSE_LIMIT_BYTES = 2 * 2**30  # dense's float32 [n, e, f] activations: skipped at or past this
BUDGET_S = 15.0  # per measurement: a run whose repeats would take longer gets fewer (at least one timed call)
CHECK_TOKENS = 64
ROUTER_BIAS_STD = 0.1  # per-expert logit bias: the busiest expert gets ~1.5x the mean load, ~1% dropped at 1.25
_REFERENCE_ORDER = (MoeImpl.EP_A2A, MoeImpl.EINSUM)  # the ratio column's denominator: the first one measured
_MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------
# parsing and setup


def parse_impls(text: str) -> tuple[MoeImpl, ...]:
    """`"all"` -> IMPLS; `"einsum,ep_a2a"` -> (EINSUM, EP_A2A), duplicates dropped. ValueError naming the bad one."""
    if text.strip() == "all":
        return IMPLS
    impls = []
    for item in text.split(","):
        try:
            impls.append(MoeImpl(item.strip()))
        except ValueError:
            known = ", ".join(["all", *(m.value for m in MoeImpl)])
            raise ValueError(f"unknown moe impl {item.strip()!r} in {text!r}; known: {known}") from None
    return tuple(dict.fromkeys(impls))


def parse_capacity(text: str) -> float | None:
    """`"1.25"` -> 1.25; `"exact"` / `"none"` -> None (a slot for every token: nothing dropped)."""
    if text.strip().lower() in ("exact", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"capacity factor must be a number > 0 or 'exact', got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"capacity factor must be a number > 0 or 'exact', got {text!r}")
    return value


def moe_config(*, hidden: int = DEFAULTS["hidden"], experts: int = DEFAULTS["experts"], topk: int = DEFAULTS["topk"],
               width: int = DEFAULTS["width"], capacity_factor: float | None = DEFAULTS["capacity_factor"],
               base: str = "tiny-v4") -> ModelConfig:
    """`base` with the MoE layer's sizes replaced (no expert groups; the preset's SwiGLU limit kept)."""
    return preset(base, hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=topk,
                  moe_intermediate_size=width, capacity_factor=capacity_factor, n_group=1, topk_group=1)


def batch_rows(mesh: jax.sharding.Mesh) -> int:
    """Batch rows b: one per data-like shard (data x fsdp x expert), so the tokens split evenly over the mesh."""
    shape = dict(mesh.shape)
    return math.prod(shape.get(axis, 1) for axis in (MeshAxis.DATA, MeshAxis.FSDP, MeshAxis.EXPERT))


def make_inputs(cfg: ModelConfig, tokens: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays: expert weights gate, up [e, d, f] and down [e, f, d] (fan-in scaled), x [b, t, d], the random
    router's weights float32 [b, t, k] and indices int32 [b, t, k]."""
    if tokens % batch:
        raise ValueError(f"{tokens} tokens do not split into {batch} batch rows (one per data-like shard)")
    e, d, f, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    rng = np.random.default_rng(seed)

    def normal(shape, scale):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    gate, up, down = normal((e, d, f), d ** -0.5), normal((e, d, f), d ** -0.5), normal((e, f, d), f ** -0.5)
    x = normal((batch, tokens // batch, d), 1.0)
    logits = normal((tokens, e), 1.0) + normal((e,), ROUTER_BIAS_STD)
    indices = np.argsort(-logits, axis=-1, kind="stable")[:, :k].astype(np.int32)
    chosen = np.take_along_axis(logits, indices, -1)
    weights = np.exp(chosen - chosen.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    shape = (batch, tokens // batch, k)
    return {"gate": gate, "up": up, "down": down, "x": x, "weights": weights.astype(np.float32).reshape(shape),
            "indices": indices.reshape(shape)}


def place(cfg: ModelConfig, host: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> tuple[jax.Array, ...]:
    """(gate, up, down, x, weights, indices) on the mesh, sharded as the model shards them under the current rules."""
    rules, shape = get_rules(), dict(mesh.shape)

    def put(array, logical):
        return jax.device_put(array, NamedSharding(mesh, logical_to_spec(logical, rules, mesh_shape=shape)))

    weight_in, weight_out = (Axis.EXPERTS, Axis.EMBED, Axis.EXPERT_MLP), (Axis.EXPERTS, Axis.EXPERT_MLP, Axis.EMBED)
    return (put(host["gate"], weight_in), put(host["up"], weight_in), put(host["down"], weight_out),
            put(host["x"], (Axis.BATCH, Axis.SEQ, Axis.EMBED)), put(host["weights"], (Axis.BATCH, Axis.SEQ, None)),
            put(host["indices"], (Axis.BATCH, Axis.SEQ, None)))


def dense_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Bytes of dense's float32 [n, e, f] activations (one of several such arrays it keeps)."""
    return tokens * cfg.n_routed_experts * cfg.moe_intermediate_size * 4


# ---------------------------------------------------------------------------------------------------------------
# the functions timed


def forward_fn(cfg: ModelConfig):
    def forward(gate, up, down, x, weights, indices):
        return dispatch.routed(cfg, FFN(gate, up, down, cfg.swiglu_limit), x, weights, indices)

    return forward


def train_fn(cfg: ModelConfig):
    forward = forward_fn(cfg)

    def loss(gate, up, down, x, weights, indices):
        y = forward(gate, up, down, x, weights, indices).y.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(y))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def memory(compiled) -> dict:
    """One device's bytes of a compiled program: temp, arguments, outputs, aliased, total (None if not reported)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
                "total_bytes": None}
    temp, args, out = stats.temp_size_in_bytes, stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias = stats.alias_size_in_bytes
    return {"temp_bytes": temp, "argument_bytes": args, "output_bytes": out, "alias_bytes": alias,
            "total_bytes": temp + args + out - alias}


def reference_check(cfg: ModelConfig, host: dict[str, np.ndarray], y: np.ndarray, dropped: np.ndarray,
                    n_check: int = CHECK_TOKENS, seed: int = 1) -> dict:
    """max |y - float64 reference| over up to `n_check` random tokens none of whose assignments were dropped."""
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    flat_dropped = dropped.reshape(-1, k).any(-1)
    candidates = np.flatnonzero(~flat_dropped)
    if candidates.size == 0:
        return {"tokens": 0, "max_abs_diff": None}
    picked = np.random.default_rng(seed).choice(candidates, min(n_check, candidates.size), replace=False)
    x = host["x"].reshape(-1, d)[picked].astype(np.float64)
    indices, weights = host["indices"].reshape(-1, k)[picked], host["weights"].reshape(-1, k)[picked]
    limit = cfg.swiglu_limit
    reference = np.zeros_like(x)
    for slot in range(k):
        expert = indices[:, slot]
        gate = np.einsum("nd,ndf->nf", x, host["gate"][expert].astype(np.float64))
        up = np.einsum("nd,ndf->nf", x, host["up"][expert].astype(np.float64))
        if limit is not None:
            gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
        h = gate / (1 + np.exp(-gate)) * up
        reference += weights[:, slot, None] * np.einsum("nf,nfd->nd", h, host["down"][expert].astype(np.float64))
    diff = np.abs(y.reshape(-1, d)[picked].astype(np.float64) - reference).max()
    return {"tokens": int(picked.size), "max_abs_diff": float(diff)}


# ---------------------------------------------------------------------------------------------------------------
# the benchmark


def available_memory_bytes() -> int:
    """Memory this process can still take: MemAvailable from /proc/meminfo, else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return memory_bytes()


def default_memory_limit(backend: str) -> int:
    """Half the host memory available now (CPU: the fake devices share it), or half of one accelerator's memory
    where the backend reports it."""
    if backend != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]) // 2
    return available_memory_bytes() // 2


def moe(cfg: ModelConfig, impls: Sequence[MoeImpl], tokens: Sequence[int], mesh: jax.sharding.Mesh, *,
        repeats: int = 3, budget_s: float | None = BUDGET_S, memory_limit_bytes: int | None = None,
        check: bool = True, progress: Progress = None) -> dict:
    """Every impl in `impls` at every token count in `tokens` on `mesh`; returns a JSON-able dict (see the module
    docstring). Rows are (tokens, impl) in that order; a skipped measurement has a `skipped` (whole row) or
    `train_skipped` reason instead of its figures.

    `memory_limit_bytes`: a program whose per-device total (XLA's account), summed over the mesh's devices on a
    host platform (fake devices share its memory) or taken once on an accelerator, exceeds this is not run
    (default: `default_memory_limit`). `budget_s`: see `time_runs`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if any(n < 1 for n in tokens):
        raise ValueError(f"token counts must be >= 1, got {list(tokens)}")
    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"budget_s must be > 0 or None, got {budget_s}")
    batch = batch_rows(mesh)
    for n in tokens:
        if n % batch:
            raise ValueError(f"{n} tokens do not split into {batch} batch rows (one per data x fsdp x expert shard "
                             f"of the mesh)")
    backend = jax.default_backend()
    ragged_native = dispatch.ragged_all_to_all_supported(backend)
    limit = default_memory_limit(backend) if memory_limit_bytes is None else memory_limit_bytes
    sharing = mesh.devices.size if backend == "cpu" else 1  # fake CPU devices all live in this process
    rows = []
    for n in tokens:
        host = make_inputs(cfg, n, batch)
        with jax.set_mesh(mesh):
            args = place(cfg, host, mesh)
            rows += _measure_tokens(cfg, impls, n, batch, host, args, repeats=repeats, budget_s=budget_s,
                                    limit=limit, sharing=sharing, check=check, ragged_native=ragged_native,
                                    progress=progress)
    _add_ratios(rows)
    return {
        "layer": {"hidden": cfg.hidden_size, "experts": cfg.n_routed_experts, "topk": cfg.num_experts_per_tok,
                  "width": cfg.moe_intermediate_size, "capacity_factor": cfg.capacity_factor,
                  "swiglu_limit": cfg.swiglu_limit, "dtype": cfg.dtype},
        "mesh": {k: int(v) for k, v in dict(mesh.shape).items() if v > 1}, "batch_rows": batch,
        "backend": backend, "devices": int(mesh.devices.size), "device_kind": jax.devices()[0].device_kind,
        "ragged_all_to_all": "native" if ragged_native else "emulated",
        "repeats": repeats, "budget_s": budget_s, "memory_limit_bytes": limit, "memory_sharing_devices": sharing,
        "dense_limit_bytes": DENSE_LIMIT_BYTES, "check_tokens": CHECK_TOKENS if check else 0, "rows": rows,
    }


class _Kept:
    """A compiled function that keeps its last output (so the timed calls also give the forward's results)."""

    def __init__(self, compiled):
        self.compiled, self.last = compiled, None

    def __call__(self, *args):
        self.last = self.compiled(*args)
        return self.last


def time_runs(runs, *, repeats: int, budget_s: float | None, progress: Progress = None) -> list[dict]:
    """Wall times of each `(fn, args)` in `runs` by `v4jax.bench.interleaved_runs` (a warm-up call each, then
    `repeats` rounds round-robin, fewer calls for a run whose warm-up shows that `repeats` would exceed
    `budget_s`), except that a run whose warm-up alone exceeded `budget_s` keeps it as its one time (`warm_up`
    False) instead of being called again. Returns per run {"s": median, "times_s", "warm_up"}."""
    times, firsts = interleaved_runs(runs, repeats=repeats, budget_s=budget_s, progress=progress, skip_slow=True)
    return [{"s": statistics.median(ts), "times_s": ts, "warm_up": True} if ts else
            {"s": first, "times_s": [first], "warm_up": False} for ts, first in zip(times, firsts)]


def _over(compiled, limit: int, sharing: int) -> str | None:
    """Why a compiled program is not run (its memory), or None."""
    total = memory(compiled)["total_bytes"]
    if total is None or total * sharing <= limit:
        return None
    where = f"{total / 2**30:.1f} GiB per device" + (f" x {sharing} devices in this process" if sharing > 1 else "")
    return f"would need {where} (limit {limit / 2**30:.1f} GiB)"


def _measure_tokens(cfg, impls, n, batch, host, args, *, repeats, budget_s, limit, sharing, check, ragged_native,
                    progress):
    rows, forwards, trains = [], [], []
    for impl in impls:
        icfg = cfg.replace(moe_impl=impl)
        row = {"impl": impl.value, "tokens": n, "resolved": dispatch.resolve_impl(icfg, batch, n // batch).value}
        if row["resolved"] == MoeImpl.EP_RAGGED.value:
            row["exchange"] = "native" if ragged_native else "emulated"
        rows.append(row)
        if impl is MoeImpl.DENSE and dense_bytes(cfg, n) >= DENSE_LIMIT_BYTES:
            row["skipped"] = (f"would need {dense_bytes(cfg, n) / 2**30:.1f} GiB for one float32 [n, e, f] "
                              f"activation (limit {DENSE_LIMIT_BYTES / 2**30:g} GiB)")
            _say(progress, f"{impl.value} at {n} tokens: skipped, {row['skipped']}")
            continue
        _say(progress, f"{impl.value} at {n} tokens: compiling forward and forward+backward...")
        forward, row["compile_forward_s"] = compile_timed(forward_fn(icfg), *args)
        train, row["compile_train_s"] = compile_timed(train_fn(icfg), *args)
        row["memory_forward"], row["memory_train"] = memory(forward), memory(train)
        if reason := _over(forward, limit, sharing):
            row["skipped"] = reason
            _say(progress, f"{impl.value} at {n} tokens: skipped, {reason}")
            continue
        forwards.append((row, _Kept(forward)))
        if reason := _over(train, limit, sharing):
            row["train_skipped"] = reason
            _say(progress, f"{impl.value} at {n} tokens: forward+backward skipped, {reason}")
        else:
            trains.append((row, train))
    for key, runs in (("forward", forwards), ("train", trains)):
        if not runs:
            continue
        _say(progress, f"timing {key} of {', '.join(row['impl'] for row, _ in runs)} at {n} tokens (a warm-up "
                       f"call each, then up to {repeats} rounds)...")
        for (row, fn), timed in zip(runs, time_runs([(fn, args) for _, fn in runs], repeats=repeats,
                                                    budget_s=budget_s, progress=progress)):
            row[f"{key}_s"], row[f"{key}_times_s"], row[f"{key}_warm_up"] = timed["s"], timed["times_s"], \
                timed["warm_up"]
            _say(progress, f"  {row['impl']} {key}: {timed['s'] * 1e3:,.1f} ms ({len(timed['times_s'])} calls)")
    for row, kept in forwards:
        out, kept.last = kept.last, None
        dropped = np.asarray(out.dropped)
        row["dropped_fraction"] = float(dropped.mean())
        row["a2a_bytes"] = float(out.a2a_bytes)
        if check:
            row["check"] = reference_check(cfg, host, np.asarray(out.y), dropped)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Each row's times over the reference impl's at the same token count (ep_a2a, else einsum, else none)."""
    for n in dict.fromkeys(r["tokens"] for r in rows):
        measured = {r["impl"]: r for r in rows if r["tokens"] == n and "forward_s" in r}
        reference = next((measured[i.value] for i in _REFERENCE_ORDER if i.value in measured), None)
        for row in measured.values():
            row["versus"] = reference and reference["impl"]
            for key in ("forward", "train"):
                both = reference is not None and f"{key}_s" in row and f"{key}_s" in reference
                row[f"{key}_ratio"] = row[f"{key}_s"] / reference[f"{key}_s"] if both else None


# ---------------------------------------------------------------------------------------------------------------
# report


def _mib(value) -> str:
    return "?" if value is None else f"{value / _MIB:,.1f}"


def _ms(row: dict, key: str, repeats: int) -> str:
    if f"{key}_s" not in row:
        return "skipped"
    star = "" if len(row[f"{key}_times_s"]) >= repeats else "*" if row[f"{key}_warm_up"] else "**"
    return f"{row[f'{key}_s'] * 1e3:,.1f}{star}"


def markdown(result: dict) -> str:
    r, layer = result, result["layer"]
    cf = "exact" if layer["capacity_factor"] is None else f"{layer['capacity_factor']:g}"
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items()) or "one device"
    out = [(f"MoE dispatch: hidden {layer['hidden']}, {layer['experts']} experts, top-{layer['topk']}, width "
            f"{layer['width']}, capacity factor {cf}, {layer['dtype']}; {r['backend']} x{r['devices']} "
            f"(mesh {mesh}, batch rows {r['batch_rows']}); median of {r['repeats']} after a warm-up, the impls of "
            f"one token count timed round-robin (compile excluded)."), ""]
    header = ["impl", "tokens", "fwd ms", "fwd+bwd ms", "fwd / ref", "fwd+bwd / ref", "temp MiB fwd / fwd+bwd",
              "total MiB fwd / fwd+bwd", "dropped", "a2a MiB", "exchange", "check max |dy|"]
    body, skipped = [], []
    for row in r["rows"]:
        name = row["impl"] + (f" ({row['resolved']})" if row["resolved"] != row["impl"] else "")
        if "memory_forward" not in row:
            skipped.append(f"{name} at {row['tokens']}: {row['skipped']}")
            body.append([name, str(row["tokens"]), "skipped", "skipped"] + [""] * (len(header) - 4))
            continue
        mf, mt = row["memory_forward"], row["memory_train"]
        memory_cells = [f"{_mib(mf['temp_bytes'])} / {_mib(mt['temp_bytes'])}",
                        f"{_mib(mf['total_bytes'])} / {_mib(mt['total_bytes'])}"]
        if "skipped" in row:
            skipped.append(f"{name} at {row['tokens']}: {row['skipped']}")
            body.append([name, str(row["tokens"]), "skipped", "skipped", "", "", *memory_cells, "", "", "", ""])
            continue
        if "train_skipped" in row:
            skipped.append(f"{name} fwd+bwd at {row['tokens']}: {row['train_skipped']}")
        ratio = {key: "" if row.get(f"{key}_ratio") is None else f"{row[f'{key}_ratio']:.2f}"
                 for key in ("forward", "train")}
        check = row.get("check")
        check = "" if check is None or check["max_abs_diff"] is None else f"{check['max_abs_diff']:.1e}"
        body.append([name, str(row["tokens"]), _ms(row, "forward", r["repeats"]), _ms(row, "train", r["repeats"]),
                     ratio["forward"], ratio["train"], *memory_cells, f"{row['dropped_fraction']:.2%}",
                     f"{row['a2a_bytes'] / _MIB:,.1f}", row.get("exchange", ""), check])
    out += _table(header, body)
    references = sorted({row["versus"] for row in r["rows"] if row.get("versus")})
    notes = [f"ref: {', '.join(references) or 'none'} at the same token count."]
    times = [row[f"{key}_times_s"] for row in r["rows"] for key in ("forward", "train") if f"{key}_times_s" in row]
    if any(len(ts) < r["repeats"] for ts in times):
        notes.append(f"Starred: fewer than {r['repeats']} timed calls, since they would have taken over "
                     f"{r['budget_s']:g} s; two stars: one call with no warm-up before it, which alone took over "
                     f"{r['budget_s']:g} s.")
    notes += [f"Skipped {s}." for s in skipped]
    if any(row.get("exchange") == "emulated" for row in r["rows"]):
        notes.append(f"exchange emulated: {r['backend']} has no ragged_all_to_all, so ep_ragged moves padded chunks "
                     "with all_to_all; its a2a MiB are the rows a ragged_all_to_all would move, its time the "
                     "emulation's.")
    notes.append("Memory: XLA's per-device account of the compiled program (temp: scratch; total: arguments + "
                 "outputs + temp - aliased). a2a MiB: bytes the layer's all-to-alls move between devices, all "
                 "devices together, per forward.")
    if r["check_tokens"]:
        notes.append(f"check: max |y - float64 numpy reference| on up to {r['check_tokens']} sampled tokens with no "
                     "dropped assignment.")
    if r["backend"] == "cpu":
        notes.append("Fake CPU devices share the host's cores: times are the total work of all shards, not a "
                     "parallel speedup.")
    return "\n".join(out + [""] + notes)
