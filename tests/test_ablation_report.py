"""The ablation report from a hand-written results CSV: parsing, per-variant means and spreads, the Pareto front,
the Markdown table's cells, the error messages, and the files `write_report` leaves behind."""

import csv
import dataclasses

import pytest

from v4jax.ablation import report

GROUPS = ("accuracy[depth=0.5]", "accuracy[depth=1.0]")
# label -> (layers, ratio, cheap, full, params, kv bytes/token at 4k/32k/1m, flops/token, accuracies per seed,
#           depth=0.5 per seed, depth=1.0 per seed). CHCH is dominated at 32K: more cache than SSSM, less accuracy.
VARIANTS = {
    "MMMM": ("MMMM", "0:4", 0, 4, 412_000, (1152, 1152, 1152), 1.2e6, (0.95, 0.97), (1.0, 0.9), (0.9, 1.0)),
    "SSSM window=32": ("SSSM", "3:1", 3, 1, 400_000, (600, 330, 290), 1.1e6, (0.90, 0.94), (0.8, 1.0), (1.0, "")),
    "CHCH": ("CHCH", "4:0", 4, 0, 450_000, (500, 400, 200), 1.0e6, (0.50, 0.60), (0.4, 0.6), ("", "")),
}


def result_rows():
    for label, (layers, ratio, cheap, full, params, kv, flops, accs, d05, d10) in VARIANTS.items():
        for seed in range(2):
            yield {
                "run": f"{layers}-s{seed}", "label": label, "pattern": layers, "layers": layers, "seed": seed,
                "task": "mqar:pairs=4", "steps": 300, "params": params, "cheap_layers": cheap, "full_layers": full,
                "ratio": ratio, "kv_bytes_per_token_4k": kv[0], "kv_bytes_per_token_32k": kv[1],
                "kv_bytes_per_token_1m": kv[2], "flops_per_token": flops, "accuracy": accs[seed],
                "final_loss": 0.1 + seed, "seconds": 12.5, GROUPS[0]: d05[seed], GROUPS[1]: d10[seed]}


def write_csv(path, rows, columns=None):
    rows = list(rows)
    columns = columns or list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def results_csv(tmp_path):
    return write_csv(tmp_path / "sweep_demo" / "results.csv", result_rows())


@pytest.fixture
def summaries(results_csv):
    return report.summarize(report.read_results(results_csv))


def test_read_results_parses_types(results_csv):
    rows = report.read_results(results_csv)
    assert len(rows) == 6
    first, last = rows[0], rows[-1]
    assert first["run"] == "MMMM-s0" and first["seed"] == 0 and first["params"] == 412_000
    assert isinstance(first["params"], int) and isinstance(first["kv_bytes_per_token_4k"], float)
    assert first["accuracy"] == 0.95 and first[GROUPS[0]] == 1.0
    assert last[GROUPS[0]] == 0.6 and last[GROUPS[1]] is None


def test_summaries_pool_seeds(summaries):
    assert [s.label for s in summaries] == list(VARIANTS)
    full, sssm, chch = summaries
    assert full.seeds == 2 and full.accuracy_mean == pytest.approx(0.96) and full.accuracy_spread == pytest.approx(0.01)
    assert sssm.accuracy_mean == pytest.approx(0.92) and sssm.accuracy_spread == pytest.approx(0.02)
    assert chch.accuracy_mean == pytest.approx(0.55) and chch.accuracy_spread == pytest.approx(0.05)
    assert full.group_accuracy == pytest.approx({"depth=0.5": 0.95, "depth=1.0": 0.95})
    # depth=1.0: only seed 0 of SSSM has a value; no CHCH run has one, so the group is left out.
    assert sssm.group_accuracy == pytest.approx({"depth=0.5": 0.9, "depth=1.0": 1.0})
    assert chch.group_accuracy == pytest.approx({"depth=0.5": 0.5})
    assert (full.full_fraction, sssm.full_fraction, chch.full_fraction) == (1.0, 0.25, 0.0)
    assert sssm.kv_bytes_per_token == {"4k": 600.0, "32k": 330.0, "1m": 290.0}
    assert (sssm.layers, sssm.ratio, sssm.pattern, sssm.params) == ("SSSM", "3:1", "SSSM", 400_000)


def test_one_seed_has_zero_spread():
    (summary,) = report.summarize([dict(next(result_rows()), seed=0)])
    assert summary.seeds == 1 and summary.accuracy_spread == 0.0 and summary.accuracy_mean == 0.95


def test_pareto_front():
    points = [
        (1.0, 0.5),   # 0 front
        (2.0, 0.5),   # 1 dominated by 0 (tie in y, more x)
        (2.0, 0.9),   # 2 front
        (2.0, 0.9),   # 3 front: an identical point does not dominate
        (3.0, 0.8),   # 4 dominated by 2
        (0.5, 0.1),   # 5 front: cheapest
        (1.0, 0.4),   # 6 dominated by 0 (tie in x, less y)
        (4.0, 0.95),  # 7 front: most accurate
    ]
    assert report.pareto_front(points) == [5, 0, 2, 3, 7]
    assert report.pareto_front([]) == []
    assert report.pareto_front([(3.0, 0.2)]) == [0]


def table_rows(table: str) -> dict[str, list[str]]:
    """First cell (label) -> cells, for the body rows of the first Markdown table in `table`."""
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return {row[0]: row for row in cells}


def test_markdown_table(summaries):
    table = report.markdown_table(summaries)
    header = table.splitlines()[0]
    assert header == ("| pattern | layers | cheap:full | params | KV B/token @4K | KV B/token @32K | KV B/token @1M "
                      "| FLOPs/token | accuracy | acc depth=0.5 | acc depth=1.0 |")
    rows = table_rows(table)
    # Front at 32K: SSSM (330 B, 0.92) and MMMM (1152 B, 0.96); CHCH (400 B, 0.55) is dominated by SSSM.
    assert set(rows) == {"MMMM*", "SSSM window=32*", "CHCH"}
    assert rows["MMMM*"] == ["MMMM*", "MMMM", "0:4", "412k", "1.15 kB", "1.15 kB", "1.15 kB", "1.2 MFLOP",
                             "0.960 ± 0.010 (n=2)", "0.950", "0.950"]
    assert rows["SSSM window=32*"][3:] == ["400k", "600 B", "330 B", "290 B", "1.1 MFLOP", "0.920 ± 0.020 (n=2)",
                                           "0.900", "1.000"]
    assert rows["CHCH"][-3:] == ["0.550 ± 0.050 (n=2)", "0.500", "–"]
    assert list(rows) == ["MMMM*", "SSSM window=32*", "CHCH"]  # the given order, not sorted
    footnote = table.splitlines()[-1]
    assert footnote.startswith(r"\* Pareto front") and "half the min-max range over seeds" in footnote


def test_markdown_table_escapes_labels(summaries):
    table = report.markdown_table([dataclasses.replace(summaries[0], label="[S]*3M|x")])
    assert r"| [S]\*3M\|x* |" in table


def test_missing_columns(tmp_path):
    columns = [c for c in next(result_rows()) if c not in ("accuracy", "params")]
    path = write_csv(tmp_path / "bad.csv", result_rows(), columns)
    with pytest.raises(ValueError, match=r"bad\.csv: missing column\(s\) params, accuracy"):
        report.read_results(path)


def test_bad_number(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [dict(next(result_rows()), accuracy="high")])
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: 'high' is not float"):
        report.read_results(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.read_results(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", ["", ",".join(report.REQUIRED) + "\n"])
def test_empty_csv(tmp_path, content):
    path = tmp_path / "results.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match="results.csv has no finished runs"):
        report.write_report(path, tmp_path / "out")


def test_write_report(results_csv, tmp_path):
    out = tmp_path / "out"
    paths = report.write_report(results_csv, out)
    assert paths == {"table": out / "report.md", "kv_plot": out / "accuracy_vs_kv.png",
                     "ratio_plot": out / "accuracy_vs_ratio.png"}
    for key in ("kv_plot", "ratio_plot"):
        data = paths[key].read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 1000
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_kv.png", "accuracy_vs_ratio.png", "report.md"]
    text = paths["table"].read_text()
    assert text.startswith("# Ablation: sweep_demo\n")
    assert "Task: `mqar:pairs=4`. 6 runs, 3 variants." in text
    assert "](accuracy_vs_kv.png)" in text and "](accuracy_vs_ratio.png)" in text
    assert "| SSSM window=32* | SSSM | 3:1 |" in text


def test_plot_rejects_unknown_context(summaries, tmp_path):
    with pytest.raises(ValueError, match="context must be one of"):
        report.plot_accuracy_vs_kv(summaries, tmp_path / "x.png", context="8k")
