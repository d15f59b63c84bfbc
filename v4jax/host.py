"""The host process's memory allocator: keep freed memory for reuse.

XLA:CPU allocates each call's temporaries and outputs afresh and frees them when done. glibc serves a block over its
mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and unmaps it on free, so a program whose buffers
exceed that takes a page fault on every 4 KiB of them on every call: a 1 GiB logits buffer costs ~0.25 s of faults,
and a sampler whose temporaries grow from 29 to 37 MiB went from 0.5 to 4 ms per call. Serving large blocks from the
heap and never trimming it makes every call after the first reuse warm memory. The process keeps its peak footprint,
as a long-running trainer or server does anyway.

The entry points in `train/` call `keep_freed_memory()` first thing; `V4JAX_KEEP_FREED_MEMORY=0` switches it off.
It touches only glibc; elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

OPT_OUT_ENV = "V4JAX_KEEP_FREED_MEMORY"
# glibc's <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # the largest value mallopt's int takes: about 2 GiB of free heap before any is returned


# The same two settings for a child process, read by glibc when it starts (its "tunables" environment aliases).
_CHILD_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_NEVER_TRIM)}
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc malloc serve every block from its heap (no per-block mmap) and keep freed heap memory. Returns
    whether the setting took effect: False where switched off by the environment or the C library is not glibc."""
    global _kept
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _kept


def child_environment() -> dict[str, str]:
    """os.environ for a subprocess, with this process's allocator setting: a peer measured in a child runs under
    the same malloc behaviour as the process that compares against it."""
    return {**os.environ, **(_CHILD_ENV if _kept else {})}
