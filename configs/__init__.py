"""Named runs: each module defines `config() -> v4jax.training.config.RunConfig`."""
