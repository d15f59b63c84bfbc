"""python -m train.compile_tpu --config NAME [--topology v5p:8x8x8] [--slices N] [--mesh data=..,fsdp=..]
                                [--step train|prefill|decode|all] [--set key=value ...]

Compiles a run's train step, prefill and decode step ahead of time for a TPU slice (libtpu describes it; no TPU
needed) and prints per-device memory against HBM, XLA's FLOPs, bytes and estimated step time, and the implied MFU.
A config's `pod()` gives the defaults (topology, mesh, steps, serving shape); flags override them.
Exit 0: every step fits; 1: a step does not fit (one line per step on stderr); 2: bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only the compiler is needed: don't look for local TPUs
    from v4jax.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m train.compile_tpu", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True, help="a module in configs/ (tiny_v4, v4_flash_v5p, ...)")
    parser.add_argument("--topology", help="chip:grid, e.g. v5p:8x8x8, v5e:16x16, v6e:8x8 (default: the config's)")
    parser.add_argument("--slices", type=int, help="slices joined over DCN (default: the config's, else 1)")
    parser.add_argument("--mesh", help="mesh axis sizes over all devices, e.g. data=2,fsdp=64,expert=4")
    parser.add_argument("--step", choices=["train", "prefill", "decode", "all"],
                        help="which steps (default: the config's, else all)")
    parser.add_argument("--batch", type=int, help="serving rows (default: the config's)")
    parser.add_argument("--max-len", type=int, help="serving cache positions per row")
    parser.add_argument("--prefill-len", type=int, help="prompt tokens per row of one prefill call")
    parser.add_argument("--verbose", action="store_true",
                        help="on a step that cannot fit, print XLA's whole report (its largest buffers)")
    parser.add_argument("--dump-specs", metavar="FILE",
                        help="write every parameter's PartitionSpec under the train rules on the mesh to FILE "
                             "(the golden file tests compare against) and exit; compiles nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run field: train.batch_size=256, model.sliding_window=64")
    args = parser.parse_args(argv)

    from v4jax import aot
    from v4jax.training import overrides

    try:
        run = overrides.apply(overrides.load_config(args.config), args.set)
        plan = aot.resolve_plan(args.config, topology=args.topology, slices=args.slices, mesh=args.mesh,
                                step=args.step, batch=args.batch, max_len=args.max_len,
                                prefill_len=args.prefill_len)
        if args.dump_specs:
            Path(args.dump_specs).write_text(aot.partition_specs(run, plan.mesh))
            print(f"wrote {args.dump_specs}")
            return 0
        pod = aot.pod(plan.topology, plan.slices)
        mesh = aot.pod_mesh(pod, plan.mesh)
        if aot.Step.TRAIN in plan.steps:
            aot.check_train_batch(run, mesh)
    except (ValueError, TypeError, OSError) as error:
        parser.error(" ".join(str(error).split()))
    except RuntimeError as error:  # libtpu missing
        parser.error(str(error))
    print(f"{run.model.name} on {pod.describe()}; mesh {aot.mesh_text(plan.mesh)}", file=sys.stderr)
    reports = aot.compile_steps(run, pod, mesh, plan.steps, plan.serving,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(aot.table(reports))
    for report in reports:
        if report.out_of_memory and args.verbose:
            print(f"XLA's report for the {report.step} step:\n{report.out_of_memory}", file=sys.stderr)
    for line in aot.misfits(reports, pod):
        print(f"python -m train.compile_tpu: does not fit: {line}", file=sys.stderr)
    return 1 if aot.misfits(reports, pod) else 0


if __name__ == "__main__":
    sys.exit(main())
