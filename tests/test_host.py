"""The allocator setting of the entry points: after `keep_freed_memory`, a freed large block is reused without
page faults; without it (or opted out) each new block faults its pages in. Run in subprocesses: the setting is
process-wide and must not leak into the test process."""

import json
import os
import subprocess
import sys

import pytest

from v4jax import host

FAULTS = """
import json, resource, sys
import numpy as np
from v4jax import host
kept = host.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 18, np.float32)  # 64 MiB, over glibc's largest mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(json.dumps({"kept": kept, "faults": faults}))
"""


def faults(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(host.__file__)))
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    # Counts of faults, not of pages: with transparent huge pages one fault may bring in 2 MiB.
    default = faults("default")
    first = default["faults"][0]
    assert first > 0 and min(default["faults"]) > first // 2  # every block a fresh mapping
    kept = faults("keep")
    assert kept["kept"] is True and kept["faults"][0] > first // 2  # the first block is new memory either way
    assert max(kept["faults"][1:]) < first // 10
    opted_out = faults("keep", **{host.OPT_OUT_ENV: "0"})
    assert opted_out["kept"] is False and min(opted_out["faults"]) > first // 2


def test_a_child_runs_under_the_same_setting(monkeypatch):
    monkeypatch.setattr(host, "_kept", False)
    assert "MALLOC_MMAP_MAX_" not in host.child_environment()
    monkeypatch.setattr(host, "_kept", True)
    env = host.child_environment()
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert env["PATH"] == os.environ["PATH"]
