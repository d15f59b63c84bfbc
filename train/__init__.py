"""Entry points (`python -m train.<name>`): thin command lines over `v4jax`.

Each one's `__main__` calls `reexec_with_huge_pages()` first. Kept here, importing nothing but the standard
library, because the re-executed process would otherwise import JAX twice.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping


# XLA:CPU allocates each call's temporaries afresh, and glibc hands blocks over 32 MiB out as fresh mappings: every
# 4 KiB of them is a page fault on every call. A bench_tiny_v4 train step took ~925K faults (2 s of kernel time
# per 5.6 s step); with glibc's malloc asking for transparent huge pages it takes ~3K and runs in 4.0 s. glibc reads
# the tunable only when a process starts, so an entry point re-executes itself with it set.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
HUGE_PAGES_OPT_OUT = "V4JAX_HUGE_PAGES"  # "0": leave malloc as it is
THP_MODES = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_environment(env: Mapping[str, str], thp_modes: str) -> dict[str, str] | None:
    """The environment to re-execute with so glibc's malloc uses transparent huge pages, or None where nothing is
    to be done: the tunable is already there (set by the user, whatever its value, or by an earlier re-exec),
    the user opted out, or the kernel's THP mode (the text of `THP_MODES`, current mode in brackets) is never."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE in tunables or env.get(HUGE_PAGES_OPT_OUT, "1") == "0":
        return None
    if "[always]" not in thp_modes and "[madvise]" not in thp_modes:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{HUGE_PAGES_TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
    """Replace this process (same pid, arguments and working directory) with one whose malloc uses transparent
    huge pages, where `huge_pages_environment` says so; on non-glibc systems, do nothing. Call first thing in an
    entry point's `__main__`, never from a library function: the new process starts over."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        with open(THP_MODES) as f:
            modes = f.read()
    except OSError:
        return
    env = huge_pages_environment(os.environ, modes)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
