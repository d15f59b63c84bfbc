"""The layer-pattern ablation report: one Markdown table and two plots from a sweep's results CSV.

Each row of the table is one variant (a CSV `label`), pooled over its seeds. It shows what the variant costs --
parameters, KV-cache bytes per token of context at 4K / 32K / 1M tokens, forward FLOPs per token -- next to
what it scores: exact-match accuracy on the eval set, then per-group accuracies (e.g. by needle depth or by
length) when the task reports them.

How to read it:
- "0.953 ± 0.012 (n=2)" is the mean over n seeds ± half the min-max range over those seeds (not a standard
  deviation: with two or three seeds a range is all the evidence there is). Differences inside the ± are noise.
- A "*" after a label marks the Pareto front of accuracy against KV bytes/token at 32K: no other variant is at
  least as accurate with no more cache (and strictly better in one of the two). A variant off the front is beaten
  on both axes by some variant on it.
- `accuracy_vs_kv.png` plots the same trade-off (log-scale cache, the front as a staircase: the best accuracy
  reachable within a cache budget); `accuracy_vs_ratio.png` plots accuracy against the fraction of full (M)
  layers, i.e. the cheap:full ratio.

Reads only the CSV, so a report can be re-made on any machine. matplotlib (a dev dependency) is imported only by
the plotting functions, so the table works without it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import statistics
from pathlib import Path

from v4jax.cost import _si

CONTEXTS = ("4k", "32k", "1m")
FRONT_CONTEXT = "32k"  # the table's Pareto front: long enough that windowed and compressed layers pay off
_INTS = ("seed", "steps", "params", "cheap_layers", "full_layers")
_FLOATS = (*(f"kv_bytes_per_token_{c}" for c in CONTEXTS), "flops_per_token", "accuracy", "final_loss", "seconds")
REQUIRED = ("run", "label", "pattern", "layers", "task", "ratio", *_INTS, *_FLOATS)
_GROUP = re.compile(r"accuracy\[(.+)\]")


@dataclasses.dataclass(frozen=True)
class Summary:
    """One variant pooled over its seeds. Costs come from its first run (they depend on the pattern, not the seed);
    `group_accuracy` maps a group name (the `<group>` of `accuracy[<group>]`) to its mean over the runs that have
    it, and leaves out groups none of them has."""

    label: str
    pattern: str
    layers: str
    ratio: str
    cheap_layers: int
    full_layers: int
    params: int
    kv_bytes_per_token: dict[str, float]
    flops_per_token: float
    seeds: int
    accuracy_mean: float
    accuracy_spread: float
    group_accuracy: dict[str, float]

    @property
    def full_fraction(self) -> float:
        return self.full_layers / (self.cheap_layers + self.full_layers)


def read_results(path: str | os.PathLike) -> list[dict]:
    """The CSV's rows with ints and floats parsed (an empty cell, or one a short row lacks, is None). A file with
    no header at all has no runs yet: []."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        kinds = {c: int for c in _INTS} | {c: float for c in (*_FLOATS, *filter(_GROUP.fullmatch, reader.fieldnames))}
        return [{c: _parse(v, kinds.get(c), path, reader.line_num) for c, v in row.items()} for row in reader]


def _parse(value: str | None, kind: type | None, path, line: int):
    if kind is None:
        return value
    if value in ("", None):
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{path}, line {line}: {value!r} is not {kind.__name__}") from None


def summarize(rows: list[dict]) -> list[Summary]:
    """One Summary per label, in the order the labels first appear."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    return [_summary(label, runs) for label, runs in by_label.items()]


def _summary(label: str, runs: list[dict]) -> Summary:
    first, accuracy = runs[0], [r["accuracy"] for r in runs]
    groups = {}
    for column in filter(_GROUP.fullmatch, first):
        values = [r[column] for r in runs if r[column] is not None]
        if values:
            groups[_GROUP.fullmatch(column)[1]] = statistics.fmean(values)
    return Summary(
        label=label, pattern=first["pattern"], layers=first["layers"], ratio=first["ratio"],
        cheap_layers=first["cheap_layers"], full_layers=first["full_layers"], params=first["params"],
        kv_bytes_per_token={c: first[f"kv_bytes_per_token_{c}"] for c in CONTEXTS},
        flops_per_token=first["flops_per_token"], seeds=len(runs), accuracy_mean=statistics.fmean(accuracy),
        accuracy_spread=(max(accuracy) - min(accuracy)) / 2, group_accuracy=groups)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (x, y) points no other point dominates (x <= and y >=, one strictly), sorted by x: low x
    (cache) and high y (accuracy) are both better. Identical points do not dominate each other: both stay."""
    def dominated(x, y):
        return any(qx <= x and qy >= y and (qx, qy) != (x, y) for qx, qy in points)

    return sorted((i for i, p in enumerate(points) if not dominated(*p)), key=lambda i: (points[i][0], i))


def _front(summaries: list[Summary], context: str) -> list[int]:
    return pareto_front([(s.kv_bytes_per_token[context], s.accuracy_mean) for s in summaries])


def markdown_table(summaries: list[Summary]) -> str:
    """The table, rows in the given order, then a footnote on "*" and "±"."""
    groups = list(dict.fromkeys(g for s in summaries for g in s.group_accuracy))
    front = set(_front(summaries, FRONT_CONTEXT))
    header = ["pattern", "layers", "cheap:full", "params", "KV B/token @4K", "KV B/token @32K", "KV B/token @1M",
              "FLOPs/token", "accuracy", *(f"acc {g}" for g in groups)]
    lines = [_row(header), _row(["---"] * len(header))]
    for i, s in enumerate(summaries):
        lines.append(_row([
            _escape(s.label) + ("*" if i in front else ""), s.layers, s.ratio, _si(s.params, "").replace(" ", ""),
            *(_si(s.kv_bytes_per_token[c], "B") for c in CONTEXTS), _si(s.flops_per_token, "FLOP"),
            f"{s.accuracy_mean:.3f} ± {s.accuracy_spread:.3f} (n={s.seeds})",
            *(f"{s.group_accuracy[g]:.3f}" if g in s.group_accuracy else "–" for g in groups)]))
    lines += ["", rf"\* Pareto front of mean accuracy vs KV bytes/token at {FRONT_CONTEXT.upper()}: no other "
              "variant is at least as accurate with no more cache. ± is half the min-max range over seeds; n is the "
              "seed count."]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _escape(text: str) -> str:
    """Labels may hold "|" (would split the cell) or "*" (would pair with the front's "*" into emphasis)."""
    return text.replace("\\", "\\\\").replace("|", r"\|").replace("*", r"\*")


def plot_accuracy_vs_kv(summaries: list[Summary], path: str | os.PathLike, context: str = "32k") -> Path:
    """Mean accuracy (± spread) against KV bytes/token at `context` (log scale), the Pareto front as a staircase."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, not {context!r}")
    xs = [s.kv_bytes_per_token[context] for s in summaries]
    fig, ax = _axes()
    _points(ax, summaries, xs)
    front = _front(summaries, context)
    fx, fy = [xs[i] for i in front], [summaries[i].accuracy_mean for i in front]
    # "post": the best accuracy reachable within a cache budget holds until the next front point's budget.
    ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
    ax.scatter(fx, fy, s=80, facecolors="none", edgecolors="tab:red", zorder=3)
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the rightmost point's label
    ax.set_xlabel(f"KV-cache bytes per token at {context.upper()} context (log)")
    ax.set_title(f"Accuracy vs KV cache at {context.upper()}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_accuracy_vs_ratio(summaries: list[Summary], path: str | os.PathLike) -> Path:
    """Mean accuracy (± spread) against the fraction of full (M) layers: 0 is all cheap, 1 all full."""
    fig, ax = _axes()
    _points(ax, summaries, [s.full_fraction for s in summaries], note=lambda s: f" ({s.ratio})")
    ax.set_xlim(-0.05, 1.15)  # room for the labels of all-full variants at 1
    ax.set_xlabel("full-layer fraction  full / (cheap + full)")
    ax.set_title("Accuracy vs cheap:full layer ratio")
    return _save(fig, path)


def _axes():
    # A bare Figure renders through Agg without pyplot: no display needed, no backend switched for the caller, and
    # nothing registered with pyplot, so nothing stays open once the figure is dropped.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_ylabel("exact-match accuracy (mean ± half range)")
    ax.grid(alpha=0.3)
    return fig, ax


def _points(ax, summaries: list[Summary], xs: list[float], note=lambda s: "") -> None:
    ys = [s.accuracy_mean for s in summaries]
    ax.errorbar(xs, ys, yerr=[s.accuracy_spread for s in summaries], fmt="o", capsize=3, color="tab:blue")
    for s, x, y in zip(summaries, xs, ys):
        ax.annotate(s.label + note(s), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)


def _save(fig, path: str | os.PathLike) -> Path:
    """Written whole or not at all: a reader never sees a half-written PNG."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


def write_report(csv_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """report.md (titled after the CSV's folder, the sweep) and the two plots in out_dir; returns their paths."""
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no finished runs")
    summaries = summarize(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "report.md",
             "kv_plot": plot_accuracy_vs_kv(summaries, out_dir / "accuracy_vs_kv.png", FRONT_CONTEXT),
             "ratio_plot": plot_accuracy_vs_ratio(summaries, out_dir / "accuracy_vs_ratio.png")}
    tasks = ", ".join(f"`{t}`" for t in dict.fromkeys(r["task"] for r in rows))
    text = "\n\n".join([
        f"# Ablation: {csv_path.resolve().parent.name}",
        f"Task: {tasks}. {len(rows)} runs, {len(summaries)} variants.",
        markdown_table(summaries),
        f"![accuracy vs KV bytes/token at {FRONT_CONTEXT.upper()}]({paths['kv_plot'].name})",
        f"![accuracy vs cheap:full ratio]({paths['ratio_plot'].name})"]) + "\n"
    tmp = paths["table"].with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, paths["table"])
    return paths
