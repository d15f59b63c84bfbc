"""Serving: caches and steps (`cache`, `decode`), batched sampling (`sampling`), the continuous-batching engine
(`engine`) and the OpenAI-compatible HTTP server (`server`).

    out = v4jax.serving.generate(cfg, params, prompts, max_new_tokens=32, temperature=0.0, seed=0)

Submodules are imported on first use, so `import v4jax.serving.sampling` pulls in nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

_SUBMODULES = ("cache", "decode", "engine", "loading", "sampling", "server")


def generate(cfg, params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, **options) -> list[list[int]]:
    """Generated token ids (list[list[int]]) for each prompt, a list of token ids.

    Greedy at temperature 0; otherwise prompt i samples with seed `seed + i`. Options (see
    `engine.generate`): top_k, top_p, stop_tokens, slots, max_len, chunk, mesh.
    """
    from v4jax.serving import engine

    return engine.generate(cfg, params, prompts, max_new_tokens, temperature, seed, **options)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["generate"]
