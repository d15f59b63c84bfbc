"""python -m train.train --config NAME [--set key=value ...] --workdir DIR [--steps N] [--mesh data=2,expert=2,...]

Trains a named run from `configs/`; restarting with the same workdir resumes. Bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from v4jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a module in configs/ (tiny_v4, tiny_v3, tiny_hybrid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field: train.learning_rate=1e-3, model.sliding_window=64")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides train.steps)")
    parser.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=2,expert=2,tensor=2")
    args = parser.parse_args(argv)

    from v4jax import sharding
    from v4jax.training import checkpoint, loop, overrides

    try:
        run = overrides.apply(overrides.load_config(args.config),
                              args.set + ([f"train.steps={args.steps}"] if args.steps else []))
        sizes = dict(part.split("=") for part in args.mesh.split(",") if part)
        mesh = sharding.make_mesh(**{k: int(v) for k, v in sizes.items()}) if sizes else None
        checkpoint.check_compatible(args.workdir, run.to_dict())
        dataset = loop.make_dataset(run)  # a missing path or token ids >= vocab_size fail here, nothing written
    except (ValueError, TypeError, OSError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))
    print(json.dumps(run.to_dict(), indent=1, default=str), file=sys.stderr)
    print(run.model.summary(), file=sys.stderr)
    try:
        result = loop.train(run, args.workdir, mesh, dataset=dataset)
    except loop.TrainingDiverged as error:
        parser.error(str(error))
    print(f"trained to step {result.step}, loss {result.loss:.3f}; checkpoints in {args.workdir}")
    print(loop.cost_table(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
