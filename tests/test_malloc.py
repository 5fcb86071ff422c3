import subprocess
import sys
from pathlib import Path

import pytest

from momentreg.training.malloc import keep_freed_memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# In a fresh process (the setting is process-wide), a training step's pattern: a 64 MiB and a
# 32 MiB tensor written, then both freed. After 10 such steps, count the page faults of 5 more.
# glibc's default returns both blocks to the system (munmap), so every step faults its 24,576
# pages in again; kept, the heap hands the same pages back. (It can take a few steps to settle:
# a block freed by an aligned allocation is a little too small for the next one of its size.)
PROGRAM = """
import resource, sys, torch
from momentreg.training.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    a = torch.ones(2**24)
    b = torch.ones(2**23)
    del a, b
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and ru_minflt: Linux")
@pytest.mark.skipif(
    THP.exists() and "[always]" in THP.read_text(),
    reason="transparent huge pages for every mapping: too few faults to tell the two apart",
)
def test_kept_memory_is_reused_without_page_faults():
    assert _faults("default") > 20_000  # 5 x 96 MiB in 4 KiB pages, minus what huge pages save
    assert _faults("keep") < 100


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("MOMENTREG_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
