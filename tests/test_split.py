"""`HeldOutSplit` gives exactly the datamodule's held-out rows, validation batches and samples."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dictlearn.data import ActivationDataModule
from dictlearn.data.split import HeldOutSplit
from dictlearn.errors import ConfigError

# (n_rows, block_size, val_rows, batch_size, world sizes)
CASES = [
    (4000, 512, None, 256, (1, 2, 3)),  # 1% of 4000 rows -> max(1, round(0.08)) = one block
    (1000, 4, None, 32, (1, 2, 4)),  # 1% / 4 = 2.5 blocks: Python rounds half to even -> 2
    (1000, 4, 13, 5, (1, 3)),  # val_rows rounded up to whole blocks: 16
    (777, 50, 120, 64, (1, 2, 5)),  # 150 held out, uneven shards
    (2048, 64, 0, 128, (1, 2)),  # nothing held out
    (96_000, 512, None, 4096, (1, 2, 7)),  # 1% = 960 rows -> round(1.875) = 2 blocks
    (600, 512, None, 64, (1, 2)),  # the held-out block is most of the file
]


def _file(tmp_path, n_rows: int) -> str:
    path = tmp_path / f"rows{n_rows}.h5"
    with h5py.File(path, "w") as f:
        f["acts"] = np.arange(2 * n_rows, dtype=np.float32).reshape(n_rows, 2)
    return str(path)


@pytest.mark.parametrize("n_rows, block_size, val_rows, batch_size, worlds", CASES)
def test_split_equals_the_datamodule(tmp_path, n_rows, block_size, val_rows, batch_size, worlds):
    data = ActivationDataModule(_file(tmp_path, n_rows), batch_size=batch_size, block_size=block_size,
                                val_rows=val_rows, normalize="none")
    split = HeldOutSplit(n_rows, block_size, val_rows)
    assert (split.n_train, split.n_val) == (data.n_train, data.n_val)
    assert split.heldout == (data.n_train, n_rows)
    for world_size in worlds:
        if data.n_val and data.n_val < world_size:
            continue
        for rank in range(world_size):
            assert split.val_slices(batch_size, rank, world_size) == data.val_slices(rank, world_size)
    for n, seed in ((1, 0), (block_size + 1, 0), (3 * block_size - 7, 5), (10 * n_rows, 2)):
        data.seed = seed
        assert split.sample_slices(n, seed) == data._sample_slices(n), (n, seed)


def test_every_heldout_row_is_used_once_across_ranks():
    split = HeldOutSplit(10_000, 128, 1000)  # 8 blocks = 1024 rows
    slices = [s for rank in range(3) for s in split.val_slices(100, rank, 3)]
    rows = np.concatenate([np.arange(a, b) for a, b in slices])
    np.testing.assert_array_equal(rows, np.arange(10_000 - 1024, 10_000))
    assert len({len(split.val_slices(100, rank, 3)) for rank in range(3)}) == 1  # same steps per rank


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="block_size"):
        HeldOutSplit(100, 0)
    with pytest.raises(ConfigError, match="val_rows"):
        HeldOutSplit(100, 10, -1)
