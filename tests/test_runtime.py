"""The allocator tuning the `dictlearn` command applies: freed large blocks are reused, not re-faulted."""

import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB tensor a few times (the heap's steady state: torch's 64-byte
# aligned blocks need a few heap growths before freed ones coalesce into a fit), then counts the page
# faults of doing it once more.
PROBE = """
import resource, sys, torch
from dictlearn.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
for _ in range(6):
    torch.ones(1 << 24)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 24)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_large_blocks_are_reused_without_page_faults():
    applied, tuned = faults("tuned")
    _, untuned = faults("plain")
    assert applied == "True"
    # 64 MiB in 4 KiB pages is 16,384 faults when the block comes back from the kernel zeroed
    assert untuned > 8000
    assert tuned < 1000
