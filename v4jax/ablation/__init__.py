"""Layer-pattern ablations: long-range synthetic tasks, sweeps, reports."""
