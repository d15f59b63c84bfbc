"""Benchmarks from the command line; the measuring lives in `v4jax.bench`.

    python -m train.bench forward --config tiny-hybrid --seq 4096 [--batch 1] [--repeats 5] [--layer-seq 16384]
                                  [--json out.json]

Prints a Markdown table on stdout (progress on stderr): whole-model forward tokens/s, the split of attention time
between `M` (full MLA) and `S` (sliding-window MLA) layers, and one S layer's cost relative to one M layer at
`--layer-seq` tokens next to the FLOP ratios the kernels predict.
"""

from __future__ import annotations

import json
import sys


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
    return parser


def main(argv: list[str] | None = None) -> int:
    from v4jax import bench, cli, config, model

    parser = _parser()
    args = parser.parse_args(argv)
    if args.config not in config.PRESETS:
        parser.error(f"unknown preset {args.config!r}; known: {', '.join(sorted(config.PRESETS))}")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
