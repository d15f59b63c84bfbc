"""python -m train.ablate --sweep NAME [--out DIR] [--set key=value ...] [--seeds 0,1] [--report-only]

Runs a layer-pattern sweep from `configs/` (a module with `sweep()`), then writes its report: `results.csv`,
`report.md` (the table) and two plots in the output directory. Re-running finishes what is missing; runs already
in `results.csv` are skipped. `--set` changes the sweep's base run (`train.steps=50`, `model.sliding_window=16`).
Bad input is one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from v4jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="a module in configs/ with sweep(), e.g. ablate_cpu")
    parser.add_argument("--out", help="output directory (default runs/ablate/NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the sweep's base run: train.steps=50")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the sweep's")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from results.csv")
    args = parser.parse_args(argv)

    from v4jax.ablation import report, sweep
    from v4jax.training import overrides

    out = Path(args.out or f"runs/ablate/{args.sweep}")
    try:
        chosen = sweep.load(args.sweep)
        changes = {"base": overrides.apply(chosen.base, args.set)}
        if args.seeds:
            changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
        chosen = dataclasses.replace(chosen, **changes)
        if args.report_only and not (out / sweep.RESULTS).exists():
            raise ValueError(f"--report-only: no {out / sweep.RESULTS} yet")
    except (ValueError, TypeError) as error:
        parser.error(" ".join(str(error).split()))
    if not args.report_only:
        sweep.run(chosen, out, log=lambda line: print(line, flush=True))
    paths = report.write_report(out / sweep.RESULTS, out)
    print(paths["table"].read_text())
    print(f"report: {paths['table']}; plots: {paths['kv_plot']}, {paths['ratio_plot']}")
    return 0


if __name__ == "__main__":
    from train import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
