"""One peak-memory measurement for every training run the benchmarks compare (dictlearn's and the
peers'), so their memory columns mean the same thing."""

from __future__ import annotations

import resource


class PeakMemory:
    """Growth of the peak memory inside the `with` block, in bytes (`.bytes` after it):
    CUDA: `max_memory_allocated` above what was allocated at the start; CPU: the growth of the
    process's max RSS (the page cache is not RSS)."""

    def __init__(self, device: str):
        self.cuda, self.bytes = device == "cuda", 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.bytes = torch.cuda.max_memory_allocated() - self._before
        else:  # ru_maxrss is in KiB on Linux
            self.bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._before) * 1024
