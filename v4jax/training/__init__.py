"""Training: the run config, the pure train step, optimizers, data, checkpoints, metrics and the loop."""
