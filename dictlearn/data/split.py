"""Which rows of an activation file train and which are held out: `HeldOutSplit`.

The held-out rows are the file's *tail*: whole blocks of `block_size` rows counted from the end,
``ceil(val_rows / block_size)`` of them, or, with ``val_rows=None``, about 1% of the file and at
least one block. They do not depend on any seed, so every run on a file (and `dictlearn
evaluate`) measures the same rows. Rows ``[0, n_train)`` are the training rows.

    split = HeldOutSplit(n_rows=4000, block_size=512)   # val_rows=None: 1% -> one block
    split.n_train, split.n_val                          # (3488, 512)
    split.val_slices(batch_size=256, rank=0, world_size=2)

`ActivationDataModule` follows the same rules (its module docstring); tests/test_split.py proves
the two agree row for row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dictlearn.errors import ConfigError, DataError

# The datamodule's seed stream for sampled rows (normalisation, initialisation, ablation means);
# the block and row orders use streams 1 and 2, so samples never share their random draws.
SAMPLE_STREAM = 3


def split_evenly(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """`[start, stop)` cut into `parts` contiguous ranges whose lengths differ by at most one."""
    bounds = [start + (stop - start) * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class HeldOutSplit:
    """The training head and the held-out tail of a file of `n_rows` rows.

    Args:
        n_rows: rows in the file.
        block_size: rows per block; the held-out tail is whole blocks.
        val_rows: held-out rows, rounded up to whole blocks (at most the file); None: about 1%
            of the rows, at least one block; 0: none.
    """

    n_rows: int
    block_size: int = 512
    val_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be > 0 (got {self.block_size})")
        if self.val_rows is not None and self.val_rows < 0:
            raise ConfigError(f"val_rows must be >= 0 (got {self.val_rows})")
        if self.n_rows < 0:
            raise ConfigError(f"n_rows must be >= 0 (got {self.n_rows})")

    @property
    def n_val(self) -> int:
        """Held-out tail rows: whole blocks, at most the whole file."""
        if self.val_rows is None:  # about 1% of the file, at least one block
            blocks = max(1, round(0.01 * self.n_rows / self.block_size))
        else:
            blocks = math.ceil(self.val_rows / self.block_size)
        return min(blocks * self.block_size, self.n_rows)

    @property
    def n_train(self) -> int:
        """Training rows: `[0, n_train)`."""
        return self.n_rows - self.n_val

    @property
    def heldout(self) -> tuple[int, int]:
        """The held-out rows as one range `[n_train, n_rows)`."""
        return self.n_train, self.n_rows

    def val_slices(self, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """Rank `rank`'s validation batches as row ranges.

        The tail is cut into `world_size` contiguous near-equal ranges, one per rank, each cut
        into the same number of near-equal batches of at most `batch_size` rows: every rank runs
        the same number of steps and every held-out row is used once.
        """
        n_val = self.n_val
        if n_val == 0:
            return []
        if n_val < world_size:
            raise DataError(f"{n_val} validation rows cannot feed {world_size} ranks")
        shards = split_evenly(self.n_train, self.n_rows, world_size)
        n_batches = math.ceil(math.ceil(n_val / world_size) / batch_size)
        return split_evenly(*shards[rank], n_batches)

    def sample_slices(self, n_rows: int, seed: int) -> list[tuple[int, int]]:
        """Up to `n_rows` training rows as whole random blocks in file order, a function of `seed`."""
        starts = np.arange(0, self.n_train, self.block_size)
        order = np.random.default_rng([seed, SAMPLE_STREAM]).permutation(len(starts))
        chosen = np.sort(starts[order[: math.ceil(n_rows / self.block_size)]])
        slices, remaining = [], min(n_rows, self.n_train)
        for start in chosen.tolist():
            stop = min(start + self.block_size, self.n_train, start + remaining)
            slices.append((start, stop))
            remaining -= stop - start
        return [s for s in slices if s[1] > s[0]]
