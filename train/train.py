"""python -m train.train --config NAME [--set key=value ...] --workdir DIR [--steps N] [--mesh data=2,expert=2,...]
                       [--multihost [--coordinator HOST:PORT --num-processes N --process-id I]]

Trains a named run from `configs/`; restarting with the same workdir resumes. Bad input is one line, exit 2.
With --multihost, every host runs the same command: the processes join one JAX runtime (jax.distributed), --mesh
sizes cover every host's devices, each process reads its block of each global batch, and checkpoints are written
by all of them together into a workdir every host sees.
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
    parser.add_argument("--multihost", action="store_true",
                        help="one process per host: call jax.distributed.initialize() (a TPU pod detects the rest)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="with --multihost: process 0's address")
    parser.add_argument("--num-processes", type=int, help="with --multihost: how many processes")
    parser.add_argument("--process-id", type=int, help="with --multihost: this process's id, 0 .. N-1")
    args = parser.parse_args(argv)

    cluster = (args.coordinator, args.num_processes, args.process_id)
    if args.multihost:
        from v4jax.training import distributed

        try:  # before anything else touches a device: afterwards jax.devices() lists every process's devices
            distributed.initialize(*cluster)
        except (ValueError, RuntimeError) as error:
            parser.error(" ".join(str(error).split()))
    elif any(v is not None for v in cluster):
        parser.error("--coordinator, --num-processes and --process-id need --multihost")

    from v4jax import sharding
    from v4jax.training import checkpoint, distributed, loop, overrides

    try:
        run = overrides.apply(overrides.load_config(args.config),
                              args.set + ([f"train.steps={args.steps}"] if args.steps else []))
        sizes = dict(part.split("=") for part in args.mesh.split(",") if part)
        mesh = sharding.make_mesh(**{k: int(v) for k, v in sizes.items()}) if sizes else None
        distributed.check_mesh(mesh)
        checkpoint.check_compatible(args.workdir, run.to_dict())
        dataset = loop.make_dataset(run, mesh)  # a missing path or ids >= vocab_size fail here, nothing written
    except (ValueError, TypeError, OSError) as error:
        parser.error(" ".join(line.strip() for line in str(error).splitlines()))
    primary = distributed.is_primary()  # with several processes only process 0 prints the summaries
    if primary:
        print(json.dumps(run.to_dict(), indent=1, default=str), file=sys.stderr)
        print(run.model.summary(), file=sys.stderr)
    try:
        result = loop.train(run, args.workdir, mesh, dataset=dataset)
    except loop.TrainingDiverged as error:
        parser.error(str(error))
    if primary:
        print(f"trained to step {result.step}, loss {result.loss:.3f}; checkpoints in {args.workdir}")
        print(loop.cost_table(run))
    return 0


if __name__ == "__main__":
    from train import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
