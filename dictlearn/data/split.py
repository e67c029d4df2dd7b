"""Which rows of an activation file train and which are held out: `HeldOutSplit`.

Two kinds of split (`HeldOutSplit.kind`), chosen by `HeldOutSplit.from_file`:

- ``documents``: a file from `dictlearn harvest` records held-out *documents* (its ``documents/``
  group, `dictlearn.harvest.plan`) and holds their rows after all training rows, from the row
  ``heldout_start``. Rows ``[0, heldout_start)`` train; the held-out rows are the first `val_rows`
  of ``[heldout_start, n_rows)`` (None: all of them; 0: none). No training row shares a document
  with a held-out row (`check_documents` proves it for a file).
- ``tail``: any other file (a plain h5py one, or one harvested before documents were recorded).
  The held-out rows are the file's *tail*: whole blocks of `block_size` rows counted from the
  end, ``ceil(val_rows / block_size)`` of them, or, with ``val_rows=None``, about 1% of the file
  and at least one block. Rows ``[0, n_train)`` train.

Neither depends on a training seed, so every run on a file (and `dictlearn evaluate`) measures
the same rows.

    split = HeldOutSplit(n_rows=4000, block_size=512)   # val_rows=None: 1% -> one block
    split.n_train, split.n_val                          # (3488, 512)
    split.val_slices(batch_size=256, rank=0, world_size=2)
    HeldOutSplit.from_file("acts.h5", n_rows).summary() # {"heldout": "documents", "heldout_rows": ...}

`ActivationDataModule` follows the same rules (its module docstring); tests/test_split.py proves
the two agree row for row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np

from dictlearn.errors import ConfigError, DataError

DOCUMENTS = "documents"  # the group `dictlearn harvest` records documents in (dictlearn.harvest.plan)

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
    heldout_start: int | None = None  # the first row of held-out documents; None: the tail split
    documents: int | None = None  # documents with held-out rows (None: the file has no doc_index)
    train_documents: int | None = None  # documents with training rows (documents split only)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be > 0 (got {self.block_size})")
        if self.val_rows is not None and self.val_rows < 0:
            raise ConfigError(f"val_rows must be >= 0 (got {self.val_rows})")
        if self.n_rows < 0:
            raise ConfigError(f"n_rows must be >= 0 (got {self.n_rows})")
        if self.heldout_start is not None and not 0 < self.heldout_start < self.n_rows:
            raise DataError(f"heldout_start {self.heldout_start}: must be inside (0, {self.n_rows})")

    @classmethod
    def from_file(cls, path: str, n_rows: int, block_size: int = 512, val_rows: int | None = None) -> HeldOutSplit:
        """The split a file calls for: its recorded held-out documents, else the tail (module docstring)."""
        with h5py.File(path, "r") as f:
            group = f.get(DOCUMENTS)
            start = group.attrs.get("heldout_start") if isinstance(group, h5py.Group) else None
            if start is not None:
                if not 0 < int(start) < n_rows:
                    raise DataError(f"{path}: {DOCUMENTS}/heldout_start = {int(start)} is outside the file's "
                                    f"{n_rows} rows; the file was edited after harvest — re-harvest it")
                heldout = group["heldout"][()]
                return cls(n_rows, block_size, val_rows, int(start), int(heldout.sum()), int((~heldout).sum()))
            tail = cls(n_rows, block_size, val_rows)
            first, last = tail.heldout
            documents = f.get("doc_index")
            if not isinstance(documents, h5py.Dataset) or documents.shape != (n_rows,) or first == last:
                return tail
            ids = documents[first:last]
            return cls(n_rows, block_size, val_rows, documents=len(np.unique(ids[ids >= 0])))

    @property
    def kind(self) -> str:
        """``documents`` (held-out documents recorded in the file) or ``tail``."""
        return "tail" if self.heldout_start is None else "documents"

    @property
    def n_val(self) -> int:
        """Held-out rows: the first `val_rows` of the held-out documents' (all: None), or the tail:
        whole blocks, at most the whole file."""
        if self.heldout_start is not None:
            available = self.n_rows - self.heldout_start
            return available if self.val_rows is None else min(self.val_rows, available)
        if self.val_rows is None:  # about 1% of the file, at least one block
            blocks = max(1, round(0.01 * self.n_rows / self.block_size))
        else:
            blocks = math.ceil(self.val_rows / self.block_size)
        return min(blocks * self.block_size, self.n_rows)

    @property
    def n_train(self) -> int:
        """Training rows: `[0, n_train)`."""
        return self.n_rows - self.n_val if self.heldout_start is None else self.heldout_start

    @property
    def heldout(self) -> tuple[int, int]:
        """The held-out rows as one range `[n_train, n_train + n_val)`."""
        return self.n_train, self.n_train + self.n_val

    def summary(self) -> dict[str, object]:
        """What a results line records: ``heldout`` (``documents`` | ``tail``), ``heldout_rows``,
        ``heldout_documents`` (None without doc_index), ``train_rows``, ``train_documents``."""
        return {"heldout": self.kind, "heldout_rows": self.n_val, "heldout_documents": self.documents,
                "train_rows": self.n_train, "train_documents": self.train_documents}

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
        shards = split_evenly(*self.heldout, world_size)
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


def check_documents(path: str, chunk_rows: int = 1 << 20) -> dict[str, int]:
    """Prove a harvested file's split from its rows: no row before ``heldout_start`` belongs to
    a held-out document and every row after it does (BOS rows, doc_index -1, belong to none), and
    the recorded rows per document match. Reads ``doc_index`` in chunks.
    -> {"train_rows", "heldout_rows", "train_documents", "heldout_documents"}; a DataError names
    the first row that breaks the split."""
    with h5py.File(path, "r") as f:
        group = f.get(DOCUMENTS)
        if not isinstance(group, h5py.Group) or "heldout_start" not in group.attrs:
            raise DataError(f"{path}: records no held-out documents ({DOCUMENTS}/heldout_start); its readers use "
                            "the tail split")
        start, doc_index = int(group.attrs["heldout_start"]), f["doc_index"]
        index, heldout, rows = group["index"][()], group["heldout"][()], group["rows"][()]
        is_heldout = np.zeros(max(int(index.max()) + 1, 1), bool)
        is_heldout[index[heldout]] = True
        counts = np.zeros(len(is_heldout), np.int64)
        for first in range(0, len(doc_index), chunk_rows):
            ids = doc_index[first:first + chunk_rows].astype(np.int64)
            unknown = np.flatnonzero(ids >= len(is_heldout))
            if len(unknown):
                raise DataError(f"{path}: row {first + int(unknown[0])} belongs to document {int(ids[unknown[0]])}, "
                                f"which {DOCUMENTS}/ does not record; re-harvest the file")
            on_heldout_side = np.arange(first, first + len(ids)) >= start
            bad = np.flatnonzero((ids >= 0) & (is_heldout[np.clip(ids, 0, None)] != on_heldout_side))
            if len(bad):
                row = first + int(bad[0])
                side = "held-out" if row >= start else "training"
                raise DataError(f"{path}: row {row} (doc_index {int(ids[bad[0]])}) is on the {side} side of row "
                                f"{start} but its document is not; the split does not hold — re-harvest the file")
            counts += np.bincount(ids[ids >= 0], minlength=len(counts))
    if not np.array_equal(counts[index], rows) or counts.sum() != rows.sum():
        raise DataError(f"{path}: {DOCUMENTS}/rows disagrees with doc_index; re-harvest the file")
    return {"train_rows": start, "heldout_rows": len(doc_index) - start,
            "train_documents": int((~heldout).sum()), "heldout_documents": int(heldout.sum())}
