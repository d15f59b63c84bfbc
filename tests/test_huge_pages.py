"""The entry points' re-exec with glibc's malloc on transparent huge pages: when it applies, that it re-executes
once with the same arguments, and that big blocks then fault in far fewer times (XLA:CPU's per-call buffers)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(train.__file__).resolve().parent.parent
MADVISE = "always [madvise] never\n"
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # base pages in the test's 64 MiB block

# malloc + touch + free a 64 MiB block three times through libc, as XLA:CPU does with a call's buffers.
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
counts = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(ctypes.c_void_p(block))
print(min(counts))
"""


def thp_mode() -> str:
    try:
        return Path(train.THP_MODES).read_text()
    except OSError:
        return ""


def test_the_environment_gains_the_tunable_only_when_it_should():
    env = train.huge_pages_environment({"PATH": "/bin"}, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = train.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always] madvise never")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert train.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE) is None  # the user's
    assert train.huge_pages_environment({train.HUGE_PAGES_OPT_OUT: "0"}, MADVISE) is None
    assert train.huge_pages_environment({}, "always madvise [never]\n") is None


needs_thp = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or "[never]" in thp_mode() or not thp_mode(),
                               reason="glibc with transparent huge pages")


def run(code: str, *args: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", train.HUGE_PAGES_OPT_OUT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          cwd=ROOT, env={**clean, **env}).stdout


@needs_thp
def test_an_entry_point_reexecutes_itself_once_with_its_arguments():
    code = ("import os, sys, train; print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:]); "
            "train.reexec_with_huge_pages()")
    first, second = run(code, "--x", "1").splitlines()
    pid, tunables, args = second.split(" ", 2)
    assert first.split(" ")[:2] == [pid, "None"]  # the same process, without the tunable the first time
    assert tunables == "glibc.malloc.hugetlb=1" and args == "['--x', '1']"
    assert run(code, **{train.HUGE_PAGES_OPT_OUT: "0"}).count("\n") == 1  # opted out: no re-exec


@needs_thp
def test_big_blocks_fault_in_far_fewer_times_on_huge_pages():
    plain = int(run(FAULTS))
    huge = int(run(FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"))
    assert plain > PAGES // 2  # a fresh mapping each time: about one fault per base page of the 64 MiB
    assert huge < plain // 4, (huge, plain)
