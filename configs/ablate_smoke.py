"""A two-variant, few-step sweep that runs every part of the ablation toolkit in seconds (the tests' fixture)."""

import dataclasses

from configs.ablate_cpu import base_run
from v4jax.ablation.sweep import Sweep, variants


def sweep() -> Sweep:
    run = base_run(steps=4, seq_len=48, task="synthetic:mqar:pairs=4,keys=8,values=8,stride=1,bound=1")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=4, log_every=2))
    return Sweep(name="ablate_smoke", base=run, variants=variants(["SSSS", "SSSM"]), seeds=(0,), eval_rows=16)
