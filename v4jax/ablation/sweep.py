"""Layer-pattern sweeps: train every (variant, seed) with the normal training loop, score it, one CSV row each.

A sweep is a `configs/<name>.py` module whose `sweep()` returns a `Sweep`: a base `RunConfig` (the model every
variant shares and the training settings; `train.data` names the task, `"synthetic:mqar:pairs=4,stride=8"`), the
variants (layer patterns, each with optional model-field changes such as `sliding_window=32`), and the seeds.
`ratio_grid` generates variants: a count of full layers x a placement rule x any model-field axes.

`run(sweep, out_dir)`:
1. prints every variant's explicit layers, cheap:full ratio and parameter count, and refuses a sweep whose counts
   differ by more than `param_tolerance` (a ratio comparison at unequal size measures the size);
2. prints the task's reach: for MQAR, the gap between every key and its query against the stacked span of the
   cheap layers (layers x window), since a gap inside the span lets local layers relay the answer;
3. trains each run in `out_dir/runs/<run>` with `loop.train` (so an interrupted run resumes from its checkpoint),
   evaluates its exact-match accuracy on held-out examples (`tasks.evaluate`; eval seed fixed, so every run sees
   the same examples) and rewrites `out_dir/results.csv` atomically with one more row. A run already in the CSV is
   skipped, so re-running a sweep finishes what is missing.

CSV columns (`COLUMNS`, then one `accuracy[<group>]` per evaluation group): the cost columns come from `cost.py`
for the variant's model: KV-cache bytes per token of context (`kv_cache_bytes(T) / T`, bf16) at 4K, 32K and 1M,
and forward FLOPs per token when prefilling 32K tokens.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import importlib
import itertools
import os
import pkgutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

from v4jax import cost, model
from v4jax.ablation import tasks
from v4jax.config import AttentionKind, ModelConfig, expand_pattern
from v4jax.training.config import RunConfig

COLUMNS = ("run", "label", "pattern", "layers", "seed", "task", "steps", "params", "cheap_layers", "full_layers",
           "ratio", "kv_bytes_per_token_4k", "kv_bytes_per_token_32k", "kv_bytes_per_token_1m", "flops_per_token",
           "accuracy", "final_loss", "seconds")
KV_CONTEXTS = {"4k": 4096, "32k": 32_768, "1m": 1 << 20}
FLOPS_CONTEXT = 32_768
EVAL_SEED = 0
RESULTS = "results.csv"


@dataclasses.dataclass(frozen=True)
class Variant:
    pattern: str
    changes: tuple[tuple[str, Any], ...] = ()  # model-field overrides: (("sliding_window", 32),)

    @property
    def label(self) -> str:
        return " ".join([self.pattern, *(f"{k}={v}" for k, v in self.changes)])

    @property
    def run_name(self) -> str:
        """The label as a directory name: brackets and `*` kept out."""
        return "".join(c if c.isalnum() or c in "=.-" else "_" for c in self.label.replace(" ", "-"))


def variants(patterns: Iterable[str], **axes: Iterable[Any]) -> tuple[Variant, ...]:
    """Every pattern with every combination of the model-field axes: `variants(["SSSM"], sliding_window=[8, 16])`."""
    names = list(axes)
    return tuple(Variant(p, tuple(zip(names, values))) for p in patterns
                 for values in itertools.product(*(axes[n] for n in names)))


class Placement(enum.StrEnum):
    EVEN = "even"  # spread out, the last layer full: 1 of 4 -> ...F, 2 of 4 -> .F.F
    FRONT = "front"
    BACK = "back"
    MIDDLE = "middle"


def place(layers: int, full: int, placement: Placement | str, cheap: str = "S", full_letter: str = "M") -> str:
    """The explicit pattern of `full` full layers among `layers` by `placement`."""
    if not 0 <= full <= layers:
        raise ValueError(f"cannot place {full} full layers in {layers}")
    start = {Placement.FRONT: 0, Placement.BACK: layers - full, Placement.MIDDLE: (layers - full) // 2}
    placement = Placement(placement)
    if placement is Placement.EVEN:
        where = {round((i + 1) * layers / full) - 1 for i in range(full)}
    else:
        where = set(range(start[placement], start[placement] + full))
    return "".join(full_letter if i in where else cheap for i in range(layers))


def ratio_grid(layers: int, full_counts: Iterable[int], placements: Iterable[Placement | str] = (Placement.EVEN,),
               cheap: str = "S", full: str = "M", **axes: Iterable[Any]) -> tuple[Variant, ...]:
    """Variants for a ratio study: each count of full layers in each placement (duplicates dropped, so 0 and
    `layers` full layers appear once), crossed with the model-field axes (`sliding_window=[8, 16]`)."""
    patterns = dict.fromkeys(place(layers, n, p, cheap, full) for n in full_counts for p in placements)
    return variants(patterns, **axes)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: RunConfig  # the shared model and training; train.data is the task ("synthetic:mqar:pairs=4")
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...] = (0, 1)
    eval_rows: int = 256
    param_tolerance: float | None = 0.1  # largest allowed (max - min) / max over the variants; None: no check

    def __post_init__(self):
        if not self.variants or not self.seeds:
            raise ValueError(f"sweep {self.name!r} needs at least one variant and one seed")
        labels = [v.label for v in self.variants]
        if len(set(labels)) != len(labels):
            raise ValueError(f"sweep {self.name!r} lists a variant twice: {labels}")
        self.task  # noqa: B018 (a data setting that is not an ablation task fails here)
        for variant in self.variants:
            self.model(variant)  # a bad pattern or field fails here, before anything trains

    @property
    def task(self) -> tasks.Task:
        data = self.base.train.data
        if not data.startswith("synthetic:"):
            raise ValueError(f"sweep {self.name!r}: train.data must be an ablation task, "
                             f"synthetic:<{'|'.join(tasks.TaskKind)}>[:options], got {data!r}")
        return tasks.parse(data.removeprefix("synthetic:"))

    def model(self, variant: Variant) -> ModelConfig:
        changes = dict(variant.changes)
        return self.base.model.replace(pattern=variant.pattern, num_hidden_layers=len(expand_pattern(variant.pattern)),
                                       name=f"{self.name}/{variant.run_name}", **changes)

    def run_config(self, variant: Variant, seed: int) -> RunConfig:
        return RunConfig(self.model(variant), dataclasses.replace(self.base.train, seed=seed))

    def runs(self) -> list[tuple[str, Variant, int]]:
        return [(f"{v.run_name}-s{seed}", v, seed) for v in self.variants for seed in self.seeds]


def load(name: str) -> Sweep:
    """`configs/<name>.py`'s `sweep()`; ValueError (one line) naming the sweeps there are."""
    import configs

    known = sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                   if hasattr(importlib.import_module(f"configs.{m.name}"), "sweep"))
    if name not in known:
        raise ValueError(f"unknown sweep {name!r}; sweeps in configs/: {', '.join(known)}")
    return importlib.import_module(f"configs.{name}").sweep()


# ---------------------------------------------------------------------------------------------------------------
# checks printed before training


def counts(cfg: ModelConfig) -> tuple[int, int]:
    """(cheap layers, full layers): M is full, every other kind is cheap."""
    letters = cfg.explicit_pattern
    full = letters.count(AttentionKind.FULL.value)
    return len(letters) - full, full


def check_params(sweep: Sweep) -> list[str]:
    """Lines naming each variant's layers, ratio and parameter count; ValueError when they differ by more than
    the sweep's tolerance."""
    columns = {v.label: cost_columns(sweep.model(v)) for v in sweep.variants}
    sizes = {label: c["params"] for label, c in columns.items()}
    lines = [f"  {label:<28} {c['layers']:<12} {c['ratio']:>6} cheap:full {c['params']:>10,} params"
             for label, c in columns.items()]
    spread = (max(sizes.values()) - min(sizes.values())) / max(sizes.values())
    lines.append(f"  parameter counts differ by {spread:.1%} (tolerance "
                 f"{'off' if sweep.param_tolerance is None else f'{sweep.param_tolerance:.0%}'})")
    if sweep.param_tolerance is not None and spread > sweep.param_tolerance:
        raise ValueError(f"sweep {sweep.name!r}: parameter counts differ by {spread:.1%} > "
                         f"{sweep.param_tolerance:.0%} ({min(sizes, key=sizes.get)} {min(sizes.values()):,} vs "
                         f"{max(sizes, key=sizes.get)} {max(sizes.values()):,}); match the sizes or raise "
                         f"param_tolerance")
    return lines


def reach(sweep: Sweep) -> list[str]:
    """For MQAR: the key-to-query gap against each variant's local span (layers x window; each local hop moves a
    value at most window - 1 tokens); a gap inside the span is flagged, since stacked local layers can relay it."""
    task, seq_len = sweep.task, sweep.base.train.seq_len
    if not isinstance(task, tasks.Mqar):
        return []
    gap = task.gap(seq_len)
    lines = [f"  MQAR: every query is > {gap} tokens after its key (seq_len {seq_len}); local reach is layers x "
             f"window"]
    for v in sweep.variants:
        cfg = sweep.model(v)
        span = cfg.num_hidden_layers * cfg.sliding_window
        if gap <= span:
            lines.append(f"  warning: {v.label}: gap {gap} <= layers x window = {span}: local layers may relay "
                         f"the answer, so this variant does not test beyond-window recall")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# running


def cost_columns(cfg: ModelConfig) -> dict[str, Any]:
    cheap, full = counts(cfg)
    row = {"layers": cfg.explicit_pattern, "params": cost.params(cfg)[0], "cheap_layers": cheap,
           "full_layers": full, "ratio": f"{cheap}:{full}",
           "flops_per_token": cost.flops_per_token(cfg, FLOPS_CONTEXT)}
    for key, context in KV_CONTEXTS.items():
        row[f"kv_bytes_per_token_{key}"] = cost.kv_cache_bytes(cfg, context) / context
    return row


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows, atomically: a crash leaves the previous file, never half of one."""
    extra = sorted({key for row in rows for key in row} - set(COLUMNS))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def train_and_score(sweep: Sweep, variant: Variant, seed: int, workdir: Path) -> dict[str, Any]:
    """Train one run (resuming from `workdir`), then its accuracy on the held-out examples and its cost columns."""
    from v4jax.serving import loading
    from v4jax.training import loop

    run = sweep.run_config(variant, seed)
    start = time.perf_counter()
    result = loop.train(run, workdir, progress=False)
    cfg, params, _ = loading.load_checkpoint(workdir)
    forward = jax.jit(lambda tokens: model.apply(cfg, params, tokens).logits.argmax(-1))
    scores = tasks.evaluate(sweep.task, forward, run.train.seq_len, seed=EVAL_SEED, rows=sweep.eval_rows)
    return {"label": variant.label, "pattern": variant.pattern, "seed": seed, "task": tasks.name(sweep.task),
            "steps": result.step, **cost_columns(run.model), "final_loss": result.loss,
            "seconds": round(time.perf_counter() - start, 1), **scores}


@contextlib.contextmanager
def _shared_compiles(directory: Path):
    """Seeds of a variant compile the same programs: keep them in JAX's persistent cache for the sweep (unless the
    user set a cache) so that only the first seed pays for compiling; the settings are restored afterwards.

    JAX decides once per process whether the cache is in use (`is_cache_used` remembers its first answer), so
    restoring the settings alone would leave every later compile of the process writing to the sweep's directory:
    `reset_cache` makes it decide again, before and after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    if before["jax_compilation_cache_dir"] is not None:
        yield
        return
    jax.config.update(names[0], str(directory))
    jax.config.update(names[1], 0.5)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def run(sweep: Sweep, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Run every (variant, seed) of `sweep` not yet in `out_dir/results.csv`; returns the CSV's path."""
    out = Path(out_dir)
    log(f"sweep {sweep.name}: task {tasks.name(sweep.task)}, {len(sweep.variants)} variants x "
        f"{len(sweep.seeds)} seeds, {sweep.base.train.steps} steps each")
    for line in check_params(sweep) + reach(sweep):
        log(line)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    rows = read_rows(path)
    done = {row["run"] for row in rows}
    todo = [(name, v, seed) for name, v, seed in sweep.runs() if name not in done]
    if len(todo) < len(sweep.runs()):
        log(f"  {len(sweep.runs()) - len(todo)} runs already in {path}: skipped")
    with _shared_compiles(out / "jax_cache"):
        for i, (name, variant, seed) in enumerate(todo, 1):
            row = {"run": name, **train_and_score(sweep, variant, seed, out / "runs" / name)}
            rows.append(row)
            write_rows(path, rows)
            log(f"  [{i}/{len(todo)}] {name}: accuracy {row['accuracy']:.3f}, loss {row['final_loss']:.3f}, "
                f"{row['seconds']:.0f} s")
    return path
