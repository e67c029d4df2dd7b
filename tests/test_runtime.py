"""The allocator tuning the `dictlearn` command applies: freed large blocks stay in the heap for reuse.

What is checked is glibc's own account (mallinfo2): after a 64 MiB tensor is freed, the tuned
heap still holds it as free memory to hand out again, where stock malloc has returned the mmap to
the kernel. (Counting page faults instead depends on the kernel: one with large folios or
proactive reclaim, such as a VM running DAMON, faults pages back in whatever malloc kept.)
"""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, torch
from dictlearn.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
block = torch.ones(1 << 24)  # 64 MiB
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(applied, during.hblkhd, after.fordblks + after.keepcost)
"""
BLOCK = 64 << 20


def heap_state(mode: str) -> tuple[str, int, int]:
    """-> (applied, bytes mmapped while the block lives, free bytes the heap keeps after it is freed)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, mmapped, kept = out.stdout.split()
    return applied, int(mmapped), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_large_blocks_stay_in_the_heap():
    applied, tuned_mmapped, tuned_kept = heap_state("tuned")
    _, plain_mmapped, plain_kept = heap_state("plain")
    assert applied == "True"
    assert plain_mmapped >= BLOCK and plain_kept < BLOCK  # stock: its own mmap, unmapped on free
    assert tuned_mmapped < BLOCK and tuned_kept >= BLOCK  # tuned: from the heap, kept on free
