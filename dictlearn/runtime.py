"""Process settings for fast CPU training, applied when `dictlearn fit` starts training (the
`KeepFreedMemory` callback), never on import; and `check_device`, whether a device exists here.

glibc's malloc serves a large allocation with a fresh `mmap` and hands it back to the kernel on
free, so every training step's big temporaries (the [batch, d_sae] pre-activations are 64 MiB at
4096 × 4096) are page-faulted in again, zero-filled, each step. On the reference 2-core CPU that
costs 20–25 % of a [4096, 512] @ [512, 4096] matmul on one core (`benchmarks/RESULTS.md`).
Raising malloc's mmap and trim thresholds keeps freed blocks in the heap for the next step. The
price: the process keeps its peak heap until it exits. Applied once training starts (after the
data-dependent initialisation), that peak is the training steps' own. PyTorch's CPU tuning guide
recommends a caching allocator (jemalloc, tcmalloc) for the same reason; this needs no library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from dictlearn.errors import ConfigError

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks up to this size come from the heap (glibc's ceiling here is half its heap size limit)
MMAP_THRESHOLD = 1 << 30
#: free memory at the heap's top kept rather than returned to the kernel
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Tune glibc malloc so freed large tensors are reused, not re-faulted. True if applied;
    False (and nothing changed) off Linux/glibc, if glibc refuses the values, or when the
    environment sets DICTLEARN_KEEP_FREED_MEMORY=0 (to measure or run with the stock allocator)."""
    if not sys.platform.startswith("linux") or os.environ.get("DICTLEARN_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def quiet_lightning(*messages: str) -> None:
    """Silence Lightning's start-up notes (GPU/TPU availability, the seed, a logger tip, "max_steps
    reached"), which mean nothing to a dictlearn user and break its progress display; its warnings
    still show, except torch 2.13's pytree deprecation raised inside Lightning, the note that an
    epoch (one pass over a small file) has fewer batches than the logging interval (dictlearn logs
    by global step across epochs, so no row is lost), and the warning `messages` (regular
    expressions) a caller names."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*smaller than the logging interval", *messages):
        warnings.filterwarnings("ignore", message=message)


def check_device(device: str, flag: str = "--device", allow_auto: bool = False) -> None:
    """Before any work: `device` names a torch device this machine has ("auto" where `allow_auto`).
    Imports torch, so call it after parsing."""
    if allow_auto and device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        choices = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
        raise ConfigError(f"{flag} {device!r}: not a torch device; use {choices}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{flag} {device}: no CUDA GPU is available here (torch {torch.__version__}"
                              f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{flag} {device}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag} {device}: dictlearn runs on cpu, cuda or mps; use one of them")
