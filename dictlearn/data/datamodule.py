"""`ActivationDataModule`: block-shuffled, exactly resumable, self-sharded activation batches.

Rules (all functions of the file's row count, `block_size`, `batch_size`, `val_rows` and `seed`):

- **Split** (`dictlearn.data.split.HeldOutSplit.from_file`; `heldout_summary()` says which).
  A file from `dictlearn harvest` records held-out *documents* and stores their rows after every
  training row: rows ``[0, heldout_start)`` train, validation is the first `val_rows` rows of the
  held-out documents (None: all of them). Any other file (plain h5py, or harvested before
  documents were recorded) holds out its *tail*: the last ``ceil(val_rows / block_size)`` whole
  blocks' worth of rows; ``val_rows=None`` holds out ``max(1, round(1% of rows / block_size))``
  blocks. ``val_rows=0`` validates on nothing (training still never reads held-out documents)
  and sets the ``val_dataloader``/``test_dataloader`` attributes to None, so Lightning skips
  validation. The split does not depend on `seed`, so every run in a comparison validates on
  the same rows.
- **Training blocks.** Rows ``[0, n_train)`` are cut into blocks of `block_size` from the start;
  the last block may be partial and is shuffled like any other, so every training row is used
  and no block reaches past ``n_train`` into held-out rows.
- **Epoch order.** Per epoch the blocks are permuted (generator seeded by ``(seed, epoch)``) and
  concatenated into a virtual row order; batch ``b`` is virtual rows ``[b*B, (b+1)*B)``, read as a
  few contiguous slices, then its rows are permuted in memory (seeded by ``(seed, epoch, b)``).
  Block shuffling is not an i.i.d. shuffle: rows from one block stay together in a batch. The
  trailing partial batch of an epoch is dropped; the block order changes every epoch, so
  different rows are dropped each time.
- **Sharding.** Rank ``r`` of ``w`` takes batches ``b = i*w + r`` for ``i < n_batches // w``, so
  every rank runs the same number of steps. dictlearn shards itself: run DDP with
  ``--trainer.use_distributed_sampler false``.
- **Validation batches.** The tail is split into ``w`` contiguous, near-equal row ranges (one per
  rank), each cut into the same number of near-equal batches of at most `batch_size` rows, so
  every rank runs the same number of validation steps and every held-out row is used once.
- **Resume.** The train loader counts the batches it yields; ``state_dict()`` is
  ``{"consumed", "epoch"}`` and ``load_state_dict`` makes the sampler skip them (Lightning 2.x
  saves a loader's state only when it has one: exact mid-epoch and at epoch boundaries,
  tests/test_resume.py).

Batches are ``(x, y)`` float32 CPU tensors of raw values (the model applies the normalisation
from `estimate_scales`); for an SAE ``y is x``. Datasets added with `require_keys` (a sweep whose
members read other keys of the same file, e.g. an SAE on the residual stream beside a transcoder
from the MLP input to its output) follow in the same tuple, row-aligned: ``(x, y, *extra)``;
`batch_index(key)` says where a key's tensor is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dictlearn.data.h5 import H5Array
from dictlearn.data.split import HeldOutSplit
from dictlearn.errors import ConfigError, DataError

Batch = tuple[torch.Tensor, ...]
# Distinct seed streams, so the block order, row order and samples never share random draws.
_BLOCK_STREAM, _ROW_STREAM = 1, 2  # samples use split.SAMPLE_STREAM (3)


def _read_pair(x: H5Array, y: H5Array | None, slices: Sequence[tuple[int, int]],
               extras: Sequence[H5Array] = ()) -> Batch:
    """The same row ranges from input, target and any extra datasets; `y is x` for an SAE."""
    xs = x.read_slices(slices)
    return (xs, (xs if y is None else y.read_slices(slices)), *(e.read_slices(slices) for e in extras))


class BlockShuffleBatches(Dataset):
    """Map-style dataset whose item ``(epoch, b)`` is the whole training batch `b` of `epoch`.

    A pure function of ``(seed, epoch, b)``, so workers, ranks and resumed runs agree. Use with
    ``DataLoader(batch_size=None)``: batching happens here, as a few contiguous reads.
    """

    def __init__(
        self, x: H5Array, y: H5Array | None, n_train: int, block_size: int, batch_size: int, seed: int,
        stride: int = 1, extras: Sequence[H5Array] = (),
    ):
        self.x, self.y, self.extras, self.seed = x, y, tuple(extras), seed
        self.stride = stride  # a rank reads batch b + stride after b (stride = world size): read ahead
        self.n_train, self.block_size, self.batch_size = n_train, block_size, batch_size
        self.n_batches = n_train // batch_size  # trailing partial batch dropped
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """File start and virtual end of each block, in this epoch's order: `[n_blocks]` each."""
        if self._cached is None or self._cached[0] != epoch:
            starts = np.arange(0, self.n_train, self.block_size)
            order = np.random.default_rng([self.seed, _BLOCK_STREAM, epoch]).permutation(len(starts))
            file_starts = starts[order]
            lengths = np.minimum(file_starts + self.block_size, self.n_train) - file_starts
            self._cached = (epoch, file_starts, np.cumsum(lengths))
        return self._cached[1], self._cached[2]

    def batch_slices(self, epoch: int, b: int) -> list[tuple[int, int]]:
        """The file row ranges holding virtual rows `[b*B, (b+1)*B)` of `epoch`, in order."""
        file_starts, virtual_ends = self._epoch_order(epoch)
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        slices: list[tuple[int, int]] = []
        i = int(np.searchsorted(virtual_ends, lo, side="right"))  # first block ending after lo
        while lo < hi:
            block_lo = int(virtual_ends[i - 1]) if i > 0 else 0
            start = int(file_starts[i]) + lo - block_lo
            stop = start + min(hi, int(virtual_ends[i])) - lo
            if slices and slices[-1][1] == start:  # consecutive blocks in the file: one read
                slices[-1] = (slices[-1][0], stop)
            else:
                slices.append((start, stop))
            lo, i = min(hi, int(virtual_ends[i])), i + 1
        return slices

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, index: tuple[int, int]) -> Batch:
        """``(epoch, b)`` -> ``(x [B, d_in], y [B, d_out])``, rows permuted within the batch."""
        epoch, b = index
        slices = self.batch_slices(epoch, b)
        # Start the disk reads of this batch's blocks together, and of the next batch this rank
        # will ask for, so they overlap each other and this batch's shuffle (no-op when cached).
        ahead = self.batch_slices(epoch, b + self.stride) if b + self.stride < self.n_batches else []
        for array in (self.x, self.y, *self.extras):
            if array is not None:
                array.will_need(slices + ahead)
        x, y, *extra = _read_pair(self.x, self.y, slices, self.extras)
        perm = np.random.default_rng([self.seed, _ROW_STREAM, epoch, b]).permutation(len(x))
        # The row gather in numpy, not torch's x[perm]: faster, and robust to a busy core (timings
        # in benchmarks/RESULTS.md, "Data loader").
        x_perm = torch.from_numpy(x.numpy()[perm])
        y_perm = x_perm if self.y is None else torch.from_numpy(y.numpy()[perm])
        return (x_perm, y_perm, *(torch.from_numpy(e.numpy()[perm]) for e in extra))


class EpochBatchSampler(Sampler):
    """Yields ``(epoch, b)`` for this rank's batches ``b = i*world_size + rank``, from `start`.

    `set_epoch` (called by Lightning at every epoch start, with the epoch restored on resume)
    selects the epoch; moving to another epoch clears `start`. The epoch is read when iteration
    begins, never advanced here: Lightning calls `iter()` several times and does not exhaust it.
    """

    def __init__(self, n_batches: int, rank: int = 0, world_size: int = 1):
        self.n_batches, self.rank, self.world_size = n_batches, rank, world_size
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n_batches // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for i in range(self.start, len(self)):
            yield epoch, i * self.world_size + self.rank


class ResumableLoader(DataLoader):
    """A DataLoader over `BlockShuffleBatches` that counts yielded batches for exact resume.

    ``state_dict() -> {"consumed": batches yielded this epoch, "epoch": that epoch}``; Lightning
    saves it in checkpoints and hands it back to `load_state_dict` on resume.
    """

    def __init__(self, dataset: BlockShuffleBatches, sampler: EpochBatchSampler, num_workers: int = 0):
        super().__init__(dataset, batch_size=None, sampler=sampler, num_workers=num_workers)
        self.consumed, self.consumed_epoch = 0, 0

    def __iter__(self) -> Iterator[Batch]:
        # A generator: nothing (not even worker prefetch) starts until the first batch is asked
        # for, which Lightning does after `set_epoch`.
        self.consumed_epoch, self.consumed = self.sampler.epoch, self.sampler.start
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "epoch": self.consumed_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed, epoch = int(state["consumed"]), int(state["epoch"])
        if consumed >= len(self.sampler):  # saved after the epoch's last batch: the next epoch
            consumed, epoch = 0, epoch + 1
        self.sampler.epoch, self.sampler.start = epoch, consumed
        self.consumed, self.consumed_epoch = consumed, epoch


class SliceBatches(Dataset):
    """Map-style dataset whose item `i` is the batch of rows `slices[i]` (validation/test)."""

    def __init__(self, x: H5Array, y: H5Array | None, slices: list[tuple[int, int]], extras: Sequence[H5Array] = ()):
        self.x, self.y, self.slices, self.extras = x, y, slices, tuple(extras)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> Batch:
        return _read_pair(self.x, self.y, [self.slices[i]], self.extras)


class ActivationDataModule(L.LightningDataModule):
    """Activation batches from one HDF5 file: `(x, y)` with `y is x` (SAE) or a target (transcoder).

    Args:
        path: HDF5 file holding the activations.
        input_key: dataset of inputs `[n_rows, d_in]`.
        target_key: dataset of targets `[n_rows, d_out]` for a transcoder; None for an SAE.
        batch_size: rows per training (and at most per validation) batch.
        block_size: rows per contiguous block read; the unit of shuffling and of the tail split.
        val_rows: validation rows: of the held-out documents (None = all), or of the tail,
            rounded up to whole blocks (None = about 1%); 0 = none.
        normalize: "mean_norm_sqrt_d" scales rows so that E||s*x|| = sqrt(d); "none" = 1.
        norm_sample_rows: rows (from random training blocks) used to estimate the scales.
        num_workers: DataLoader worker processes; 0 is fastest on few cores (benchmarks/RESULTS.md).
        seed: seeds the block order, row order and samples (never the val split).
        in_memory_mib: when the datasets this module reads (input, target, extras) hold at most
            this many MiB as stored, each process reads them whole once and serves batches from
            memory (`H5Array.hold_in_memory`); larger files are read block by block. 0: never.
    """

    def __init__(
        self,
        path: str,
        input_key: str = "acts",
        target_key: str | None = None,
        batch_size: int = 4096,
        block_size: int = 512,
        val_rows: int | None = None,
        normalize: Literal["mean_norm_sqrt_d", "none"] = "mean_norm_sqrt_d",
        norm_sample_rows: int = 65536,
        num_workers: int = 0,
        seed: int = 0,
        in_memory_mib: int = 512,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_config(batch_size, block_size, val_rows, normalize, norm_sample_rows, num_workers, seed, in_memory_mib)
        self.path, self.input_key, self.target_key = path, input_key, target_key
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.normalize, self.norm_sample_rows, self.num_workers = normalize, norm_sample_rows, num_workers
        self.inputs = H5Array(path, input_key)
        self.targets = None if target_key is None else H5Array(path, target_key)
        self.d_in = self.inputs.d
        self.d_out = self.d_in if self.targets is None else self.targets.d
        self._check_rows()
        self.split = HeldOutSplit.from_file(path, self.inputs.n_rows, block_size, val_rows)
        self.n_val, self.n_train = self.split.n_val, self.split.n_train
        self._check_enough_rows()
        if self.n_val == 0:
            # Lightning treats a None hook as "not defined" and skips validation silently; an
            # empty list would warn "Total length of `list` across ranks is zero" every run.
            self.val_dataloader = self.test_dataloader = None
        self._scales: tuple[float, float] | None = None
        self._key_scales: dict[str, float] = {}  # dataset key -> scale (`_scale`)
        self.extra_arrays: dict[str, H5Array] = {}  # datasets added by `require_keys`
        self.in_memory_mib = in_memory_mib
        self._hold_small_datasets()

    # ----- validation of the file against the configuration -----

    def _check_rows(self) -> None:
        if self.targets is not None and self.targets.n_rows != self.inputs.n_rows:
            raise DataError(
                f"{self.path}: input '{self.input_key}' has {self.inputs.n_rows} rows but target"
                f" '{self.target_key}' has {self.targets.n_rows}; they must be row-aligned — re-harvest"
            )

    def _check_enough_rows(self) -> None:
        # Lightning alone would warn and silently run 0 steps (docs/conventions.md#reliability).
        if self.n_train < self.batch_size:
            held = (f"{self.inputs.n_rows - self.n_train} of held-out documents" if self.split.kind == "documents"
                    else f"{self.n_val} held out for validation")
            raise DataError(
                f"{self.path}: '{self.input_key}' has {self.inputs.n_rows} rows, {held}, leaving {self.n_train}"
                f" training rows < --data.batch_size {self.batch_size}; use a smaller --data.batch_size or"
                " --data.val_rows, or more rows"
            )

    def use_split(self, split: HeldOutSplit) -> None:
        """Train on `split`'s training rows and validate on its held-out rows instead of the file's
        own split (before loaders are built). `dictlearn compare --tune-lr` trains its search runs
        with training-side documents held out as validation documents (compare/tune.py)."""
        if split.n_rows > self.inputs.n_rows:
            raise DataError(f"{self.path}: a split of {split.n_rows} rows does not fit the file's {self.inputs.n_rows}")
        self.split, self._scales, self._key_scales = split, None, {}
        self.n_val, self.n_train = split.n_val, split.n_train
        self._check_enough_rows()

    def heldout_summary(self) -> dict[str, object]:
        """Which rows validate, for results: ``heldout`` (``documents`` | ``tail``), ``heldout_rows``,
        ``heldout_documents``, ``train_rows``, ``train_documents`` (`HeldOutSplit.summary`)."""
        return self.split.summary()

    # ----- several datasets of one file (sweeps) -----

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The dataset behind each tensor of a batch: input, target (the input again for an SAE), extras."""
        return (self.input_key, self.target_key or self.input_key, *self.extra_arrays)

    def batch_index(self, key: str) -> int:
        """Where dataset `key`'s rows are in a batch."""
        if key not in self.batch_keys:
            raise ConfigError(f"{self.path}: dataset '{key}' is not served by this data module; require_keys it first")
        return self.batch_keys.index(key)

    def require_keys(self, keys) -> None:
        """Serve datasets `keys` too, row-aligned with the input, in every batch (before loaders are built)."""
        for key in keys:
            if key in self.batch_keys:
                continue
            array = H5Array(self.path, key)
            if array.n_rows != self.inputs.n_rows:
                raise DataError(
                    f"{self.path}: dataset '{key}' has {array.n_rows} rows but input '{self.input_key}' has "
                    f"{self.inputs.n_rows}; the datasets of one sweep must be row-aligned — re-harvest"
                )
            self.extra_arrays[key] = array
        self._hold_small_datasets()

    def _hold_small_datasets(self) -> None:
        """Hold every dataset this module reads in memory when together they fit `in_memory_mib`."""
        arrays = [self.inputs, *([self.targets] if self.targets is not None else []), *self.extra_arrays.values()]
        hold = sum(array.nbytes for array in arrays) <= self.in_memory_mib * 2**20
        for array in arrays:
            array.hold_in_memory(hold)

    def view(self, input_key: str, target_key: str | None) -> "ActivationDataModule | KeyView":
        """This file seen through other keys (a sweep member's): d_in/d_out, scales, samples and
        provenance as a data module with those keys would give them."""
        if (input_key, target_key) == (self.input_key, self.target_key):
            return self
        return KeyView(self, input_key, target_key)

    # ----- loaders -----

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) from the attached trainer, else (0, 1)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ConfigError(
                "dictlearn shards batches across ranks itself; pass --trainer.use_distributed_sampler false"
            )
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> ResumableLoader:
        return self._train_loader(*self._rank_world())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(*self._rank_world())

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(*self._rank_world())

    def _train_loader(self, rank: int, world_size: int) -> ResumableLoader:
        """This rank's resumable training loader (tests call it directly to simulate DDP)."""
        dataset = BlockShuffleBatches(
            self.inputs, self.targets, self.n_train, self.block_size, self.batch_size, self.seed, world_size,
            extras=list(self.extra_arrays.values()),
        )
        if dataset.n_batches < world_size:
            raise DataError(
                f"{self.path}: {dataset.n_batches} training batches of --data.batch_size"
                f" {self.batch_size} cannot feed {world_size} ranks; use a smaller batch size or more rows"
            )
        sampler = EpochBatchSampler(dataset.n_batches, rank, world_size)
        return ResumableLoader(dataset, sampler, num_workers=self.num_workers)

    def val_slices(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """This rank's validation batches as file row ranges (see the module docstring)."""
        try:
            return self.split.val_slices(self.batch_size, rank, world_size)
        except DataError as error:
            raise DataError(f"{self.path}: {error}") from None

    def check_heldout_finite(self) -> None:
        """Every held-out row of every served dataset is finite, else one line naming the file
        row: checked when training starts, not at the first validation hundreds of steps later."""
        arrays = {key: _array(self, key) for key in dict.fromkeys(self.batch_keys)}
        for key, array in arrays.items():
            for chunk in _chunks(self.val_slices(), max(1, _SCALE_CHUNK_VALUES // array.d)):
                bad = (~torch.isfinite(array.read_slices(chunk))).any(-1).nonzero().flatten()
                if len(bad):
                    rows = np.concatenate([np.arange(start, stop) for start, stop in chunk])
                    raise DataError(
                        f"{self.path}: dataset '{key}' has NaN/Inf in held-out row {rows[int(bad[0])]} "
                        f"({len(bad)} bad held-out rows in [{rows.min()}, {rows.max() + 1})); clean or re-harvest the file"
                    )

    def _eval_loader(self, rank: int, world_size: int) -> DataLoader:
        dataset = SliceBatches(self.inputs, self.targets, self.val_slices(rank, world_size), list(self.extra_arrays.values()))
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)

    # ----- samples: normalisation and initialisation -----

    def _sample_slices(self, n_rows: int) -> list[tuple[int, int]]:
        """Up to `n_rows` training rows as whole random blocks (file order), a function of `seed`."""
        return self.split.sample_slices(n_rows, self.seed)

    def sample_rows(self, n_rows: int) -> Batch:
        """Up to `n_rows` raw training rows from seeded random blocks: `(x [n, d_in], y [n, d_out])`."""
        return self._sample_pair(self.inputs, self.targets, n_rows)

    def _sample_pair(self, inputs: H5Array, targets: H5Array | None, n_rows: int) -> Batch:
        x, y = _read_pair(inputs, targets, self._sample_slices(n_rows))
        for array, rows in ((inputs, x), (targets, y)):
            if array is not None and not torch.isfinite(rows).all():
                raise DataError(
                    f"{self.path}: dataset '{array.key}' has NaN/Inf values in the sampled training rows;"
                    " clean or re-harvest the file"
                )
        return x, y

    def estimate_scales(self) -> tuple[float, float]:
        """`(input_scale, target_scale)`: ``sqrt(d) / mean ||row||_2`` on sampled training rows.

        Read a chunk of blocks at a time, so memory stays bounded. Cached on the instance.
        """
        if self._scales is None:
            self._scales = self._pair_scales(self.inputs, self.targets)
        return self._scales

    def _pair_scales(self, inputs: H5Array, targets: H5Array | None) -> tuple[float, float]:
        if self.normalize == "none":
            return 1.0, 1.0
        input_scale = self._scale(inputs)
        return input_scale, (input_scale if targets is None else self._scale(targets))

    def _scale(self, array: H5Array) -> float:
        """`sqrt(d) / mean ||row||_2` of `array`'s sampled training rows; cached by key, as the
        members of a sweep share datasets (a replacement's 24 transcoders read 8)."""
        if array.key not in self._key_scales:
            self._key_scales[array.key] = self._measure_scale(array, self._sample_slices(self.norm_sample_rows))
        return self._key_scales[array.key]

    def _measure_scale(self, array: H5Array, slices: list[tuple[int, int]]) -> float:
        norm_sum, count = 0.0, 0
        for chunk in _chunks(slices, max(1, _SCALE_CHUNK_VALUES // array.d)):  # memory: a chunk's rows
            norms = torch.linalg.vector_norm(array.read_slices(chunk).double(), dim=1)
            for part in norms.split([stop - start for start, stop in chunk]):  # the sum's order as block by block
                norm_sum += part.sum().item()
            count += len(norms)
        if not norm_sum > 0 or not math.isfinite(norm_sum):
            raise DataError(
                f"{self.path}: dataset '{array.key}' sampled rows have mean norm {norm_sum / count};"
                " cannot normalise — check the data or use --data.normalize none"
            )
        return math.sqrt(array.d) / (norm_sum / count)

    def provenance(self) -> dict[str, object]:
        """Where the data came from: file, keys and the file's attributes (model, hook, ...).

        Recorded in checkpoints and exports; for a transcoder the target's hook is `hook_name_out`.
        """
        return self._provenance(self.inputs, self.targets)

    def _provenance(self, inputs: H5Array, targets: H5Array | None) -> dict[str, object]:
        info = {k: v for k, v in inputs.attrs().items() if k not in ("complete", "dtype")}
        if targets is not None and "hook_name" in (target_attrs := targets.attrs()):
            info["hook_name_out"] = target_attrs["hook_name"]
        target_key = None if targets is None else targets.key
        info.update(path=os.path.abspath(self.path), input_key=inputs.key, target_key=target_key)
        return info

    def teardown(self, stage: str) -> None:
        for array in (self.inputs, self.targets, *self.extra_arrays.values()):
            if array is not None:
                array.close()


class KeyView:
    """An `ActivationDataModule`'s file through other keys: what a dictionary's data-dependent
    initialisation and export read (widths, scales, samples, provenance), as a data module opened
    with `input_key`/`target_key` would give them (same seeded samples, same formulas)."""

    def __init__(self, data: ActivationDataModule, input_key: str, target_key: str | None):
        data.require_keys([k for k in (input_key, target_key) if k is not None])
        self.data, self.input_key, self.target_key = data, input_key, target_key
        self.targets = None if target_key is None else _array(data, target_key)
        self.inputs = _array(data, input_key)
        self.d_in = self.inputs.d
        self.d_out = self.d_in if self.targets is None else self.targets.d
        self.path = data.path
        self._scales: tuple[float, float] | None = None

    def estimate_scales(self) -> tuple[float, float]:
        if self._scales is None:
            self._scales = self.data._pair_scales(self.inputs, self.targets)
        return self._scales

    def sample_rows(self, n_rows: int) -> Batch:
        return self.data._sample_pair(self.inputs, self.targets, n_rows)

    def provenance(self) -> dict[str, object]:
        return self.data._provenance(self.inputs, self.targets)


def _array(data: ActivationDataModule, key: str) -> H5Array:
    """The open dataset `key` of `data`'s file: its input, target or an extra one."""
    if key == data.input_key:
        return data.inputs
    if key == data.target_key:
        return data.targets
    return data.extra_arrays[key]


_SCALE_CHUNK_VALUES = 1 << 22  # values per read while measuring scales (32 MiB as float64)


def _chunks(slices: Sequence[tuple[int, int]], max_rows: int) -> Iterator[list[tuple[int, int]]]:
    """`slices` in order, grouped into lists of at most `max_rows` rows (a longer range alone)."""
    chunk, rows = [], 0
    for start, stop in slices:
        if chunk and rows + stop - start > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append((start, stop))
        rows += stop - start
    if chunk:
        yield chunk


def _check_config(
    batch_size: int, block_size: int, val_rows: int | None, normalize: str, norm_sample_rows: int,
    num_workers: int, seed: int, in_memory_mib: int,
) -> None:
    """Range checks of the constructor arguments, each naming its CLI flag."""
    positive = {"batch_size": batch_size, "block_size": block_size, "norm_sample_rows": norm_sample_rows}
    for flag, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--data.{flag} must be > 0 (got {value})")
    for flag, value in (("num_workers", num_workers), ("seed", seed), ("val_rows", val_rows or 0),
                        ("in_memory_mib", in_memory_mib)):
        if value < 0:
            raise ConfigError(f"--data.{flag} must be >= 0 (got {value})")
    if normalize not in ("mean_norm_sqrt_d", "none"):
        raise ConfigError(f"--data.normalize must be 'mean_norm_sqrt_d' or 'none' (got {normalize!r})")
