"""ActivationDataModule: split, block shuffle, sharding, exact resume, scales (datamodule.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dictlearn.data import ActivationDataModule, write_datasets
from dictlearn.errors import ConfigError, DataError

N_ROWS, BLOCK, BATCH, VAL = 64 * 50 + 37, 64, 100, 200  # val: 200 rows -> 4 blocks = 256 rows
N_VAL = 256
N_TRAIN = N_ROWS - N_VAL  # 2981: last training block is partial (37 rows)
N_BATCHES = N_TRAIN // BATCH  # 29; the trailing 81 rows of each epoch's order are dropped


@pytest.fixture
def index_file(tmp_path):
    """Rows that encode their own index: acts[i] = (i, 1, -i); target[i] = (2i, i + 0.5)."""
    i = np.arange(N_ROWS, dtype=np.float32)
    acts = np.stack([i, np.ones_like(i), -i], axis=1)
    target = np.stack([2 * i, i + 0.5], axis=1)
    write_datasets(tmp_path / "idx.h5", {"acts": acts, "target": target, "short": target[:-1]}, {})
    return str(tmp_path / "idx.h5")


def _dm(path, **kwargs):
    args = dict(batch_size=BATCH, block_size=BLOCK, val_rows=VAL) | kwargs
    return ActivationDataModule(path, **args)


def _rows(batches):
    """Row indices of each batch, as a list of int arrays."""
    return [x[:, 0].long().numpy() for x, _ in batches]


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return _rows(list(loader))


def test_split_is_the_tail_in_whole_blocks(index_file):
    dm = _dm(index_file)
    assert (dm.n_val, dm.n_train, dm.d_in, dm.d_out) == (N_VAL, N_TRAIN, 3, 3)
    val = np.concatenate(_rows(list(dm.val_dataloader())))
    np.testing.assert_array_equal(val, np.arange(N_TRAIN, N_ROWS))
    assert _dm(index_file, seed=7).n_val == N_VAL  # independent of the seed


def test_default_val_rows_is_about_one_percent(tmp_path):
    write_datasets(tmp_path / "a.h5", {"acts": np.ones((64 * 1000, 2), np.float32)}, {})
    assert ActivationDataModule(str(tmp_path / "a.h5"), block_size=64, batch_size=64).n_val == 640
    write_datasets(tmp_path / "b.h5", {"acts": np.ones((64 * 20, 2), np.float32)}, {})
    assert ActivationDataModule(str(tmp_path / "b.h5"), block_size=64, batch_size=64).n_val == 64


def test_each_training_row_once_per_epoch(index_file):
    loader = _dm(index_file).train_dataloader()
    assert len(loader) == N_BATCHES
    for epoch in (0, 1):
        batches = _epoch(loader, epoch)
        assert [len(b) for b in batches] == [BATCH] * N_BATCHES
        rows = np.concatenate(batches)
        assert len(np.unique(rows)) == N_BATCHES * BATCH and rows.max() < N_TRAIN
        dropped = np.setdiff1d(np.arange(N_TRAIN), rows)
        assert len(dropped) == N_TRAIN - N_BATCHES * BATCH


def test_batch_is_a_few_whole_block_runs(index_file):
    dataset = _dm(index_file).train_dataloader().dataset
    orders = set()
    for b in range(N_BATCHES):
        slices = dataset.batch_slices(3, b)
        assert sum(stop - start for start, stop in slices) == BATCH
        assert len(slices) <= math.ceil(BATCH / BLOCK) + 1
        x, _ = dataset[(3, b)]
        expected = np.concatenate([np.arange(start, stop) for start, stop in slices])
        rows = x[:, 0].long().numpy()
        np.testing.assert_array_equal(np.sort(rows), np.sort(expected))
        assert not np.array_equal(rows, expected)  # rows permuted within the batch
        position = {row: i for i, row in enumerate(expected)}
        orders.add(tuple(position[row] for row in rows))  # the in-memory permutation applied
    assert len(orders) == N_BATCHES  # each batch has its own in-memory permutation


def test_orders_differ_by_epoch_and_seed_but_repeat(index_file):
    first = _epoch(_dm(index_file).train_dataloader(), 0)
    again = _epoch(_dm(index_file).train_dataloader(), 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_epoch = _epoch(_dm(index_file).train_dataloader(), 1)
    other_seed = _epoch(_dm(index_file, seed=1).train_dataloader(), 0)
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))


def test_validation_never_in_training(index_file):
    dm = _dm(index_file)
    loader = dm.train_dataloader()
    train = np.concatenate([np.concatenate(_epoch(loader, e)) for e in range(3)])
    val = np.concatenate(_rows(list(dm.val_dataloader())))
    assert np.intersect1d(train, val).size == 0


def test_small_files_are_held_in_memory_with_the_same_batches(index_file):
    """Datasets that together fit `in_memory_mib` are read whole once; every batch, validation
    batch and sample equals the block-by-block reads'."""
    held, read = _dm(index_file, target_key="target"), _dm(index_file, target_key="target", in_memory_mib=0)
    assert held.inputs.held and held.targets.held and not (read.inputs.held or read.targets.held)
    for a, b in [(held._train_loader(0, 1), read._train_loader(0, 1)), (held.val_dataloader(), read.val_dataloader())]:
        for (x1, y1), (x2, y2) in zip(a, b, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert all(torch.equal(u, v) for u, v in zip(held.sample_rows(500), read.sample_rows(500)))
    assert held.estimate_scales() == read.estimate_scales()
    # acts + target: N_ROWS x 5 float32 = 64,740 bytes
    budget = _dm(index_file, target_key="target", in_memory_mib=0)
    budget.in_memory_mib = N_ROWS * 5 * 4 / 2**20
    budget._hold_small_datasets()
    assert budget.inputs.held and budget.targets.held
    budget.in_memory_mib = (N_ROWS * 5 * 4 - 1) / 2**20
    budget._hold_small_datasets()
    assert not (budget.inputs.held or budget.targets.held)


def test_sae_batch_y_is_x_and_transcoder_target_aligned(index_file):
    x, y = next(iter(_dm(index_file).train_dataloader()))
    assert y is x and x.dtype == torch.float32 and x.shape == (BATCH, 3)
    dm = _dm(index_file, target_key="target")
    assert (dm.d_in, dm.d_out) == (3, 2)
    for x, y in [next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))]:
        assert y.shape == (len(x), 2)
        torch.testing.assert_close(y, torch.stack([2 * x[:, 0], x[:, 0] + 0.5], 1), rtol=0, atol=0)


def test_ddp_shards_are_disjoint_equal_and_cover_single_rank(index_file):
    dm = _dm(index_file)
    single = _epoch(dm._train_loader(0, 1), 2)
    ranks = [_epoch(dm._train_loader(r, 2), 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == N_BATCHES // 2
    for r in (0, 1):  # rank r's i-th batch is global batch 2i + r
        assert all(np.array_equal(batch, single[2 * i + r]) for i, batch in enumerate(ranks[r]))
    assert np.intersect1d(np.concatenate(ranks[0]), np.concatenate(ranks[1])).size == 0


def test_batch_advises_its_blocks_and_this_ranks_next_batch(index_file, monkeypatch):
    from dictlearn.data.h5 import H5Array

    advised = []
    monkeypatch.setattr(H5Array, "will_need", lambda self, slices: advised.append((self.key, list(slices))))
    dataset = _dm(index_file, target_key="target")._train_loader(1, 3).dataset
    dataset[(0, 4)]
    expected = dataset.batch_slices(0, 4) + dataset.batch_slices(0, 7)  # rank 1 of 3 reads 4, then 7
    assert advised == [("acts", expected), ("target", expected)]
    advised.clear()
    dataset[(0, N_BATCHES - 1)]  # last batch: nothing ahead
    assert advised[0] == ("acts", dataset.batch_slices(0, N_BATCHES - 1))


def test_val_shards_equal_count_and_cover_tail(index_file):
    dm = _dm(index_file, batch_size=60)
    shards = [dm.val_slices(r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # same number of val steps on every rank
    rows = np.concatenate([np.arange(a, b) for shard in shards for a, b in shard])
    np.testing.assert_array_equal(rows, np.arange(N_TRAIN, N_ROWS))
    assert max(b - a for shard in shards for a, b in shard) <= 60
    # one rank: ceil(256 / 60) = 5 near-equal contiguous batches
    assert dm.val_slices() == [(2981, 3032), (3032, 3083), (3083, 3134), (3134, 3185), (3185, 3237)]


def test_resume_mid_epoch_and_next_epoch(index_file):
    reference = _dm(index_file).train_dataloader()
    epoch0, epoch1 = _epoch(reference, 0), _epoch(reference, 1)
    for k in (0, 1, 13, N_BATCHES - 1):
        loader = _dm(index_file).train_dataloader()
        iterator = iter(loader)
        for _ in range(k):
            next(iterator)
        state = loader.state_dict()
        assert state == {"consumed": k, "epoch": 0}
        resumed = _dm(index_file).train_dataloader()
        resumed.load_state_dict(state)
        rest = _epoch(resumed, 0)  # Lightning calls set_epoch with the restored epoch
        assert len(rest) == N_BATCHES - k and all(np.array_equal(a, b) for a, b in zip(rest, epoch0[k:]))
        assert all(np.array_equal(a, b) for a, b in zip(_epoch(resumed, 1), epoch1))
        assert len(resumed) == N_BATCHES  # full epoch length: Lightning adds the batches done


def test_resume_at_epoch_boundary(index_file):
    reference = _dm(index_file).train_dataloader()
    epoch1 = _epoch(reference, 1)
    loader = _dm(index_file).train_dataloader()
    _epoch(loader, 0)
    state = loader.state_dict()
    assert state == {"consumed": N_BATCHES, "epoch": 0}
    resumed = _dm(index_file).train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 1  # even before Lightning's set_epoch(1) arrives
    assert all(np.array_equal(a, b) for a, b in zip(_rows(list(resumed)), epoch1))


def test_repeated_iter_has_no_side_effects(index_file):
    """Lightning calls iter() several times before the first epoch and abandons iterators."""
    loader = _dm(index_file).train_dataloader()
    expected = _rows([next(iter(_dm(index_file).train_dataloader()))])[0]
    for _ in range(3):
        iter(loader)
    partial = iter(loader)
    next(partial), next(partial)
    np.testing.assert_array_equal(_rows([next(iter(loader))])[0], expected)
    assert loader.state_dict() == {"consumed": 1, "epoch": 0}


def test_estimate_scales_separate_for_input_and_target(tmp_path):
    rng = np.random.default_rng(0)
    acts = (5.0 * rng.standard_normal((8192, 16)) + 1.0).astype(np.float32)
    target = (0.3 * rng.standard_normal((8192, 4))).astype(np.float32)
    write_datasets(tmp_path / "s.h5", {"acts": acts, "target": target}, {})
    dm = ActivationDataModule(str(tmp_path / "s.h5"), target_key="target", batch_size=256,
                              block_size=128, val_rows=0, norm_sample_rows=1000)
    s_in, s_out = dm.estimate_scales()
    x, y = dm.sample_rows(1000)  # the very rows the scales were estimated on
    assert len(x) == 1000
    assert torch.linalg.vector_norm(s_in * x.double(), dim=1).mean().item() == pytest.approx(4.0, rel=1e-6)
    assert torch.linalg.vector_norm(s_out * y.double(), dim=1).mean().item() == pytest.approx(2.0, rel=1e-6)
    # and on all training rows, within the 2% the sample allows
    assert np.linalg.norm(s_in * acts.astype(np.float64), axis=1).mean() == pytest.approx(4.0, rel=0.02)
    assert np.linalg.norm(s_out * target.astype(np.float64), axis=1).mean() == pytest.approx(2.0, rel=0.02)
    assert dm.estimate_scales() is dm.estimate_scales()  # cached
    # a view through the same keys (a sweep member's) reuses each key's scale; swapped keys swap them
    assert dm.view("target", "acts").estimate_scales() == (s_out, s_in)
    assert set(dm._key_scales) == {"acts", "target"}


def test_scales_none_and_sae_reuse(index_file):
    assert _dm(index_file, normalize="none").estimate_scales() == (1.0, 1.0)
    s_in, s_out = _dm(index_file).estimate_scales()
    assert s_in == s_out


def test_sample_rows_from_training_blocks_seeded(index_file):
    x, y = _dm(index_file).sample_rows(300)
    rows = x[:, 0].long().numpy()
    assert y is x and len(rows) == 300 and len(np.unique(rows)) == 300 and rows.max() < N_TRAIN
    starts = np.unique(rows // BLOCK)
    assert len(starts) == math.ceil(300 / BLOCK)  # read as whole blocks
    np.testing.assert_array_equal(_dm(index_file).sample_rows(300)[0], x)
    assert not torch.equal(_dm(index_file, seed=3).sample_rows(300)[0], x)
    assert len(_dm(index_file).sample_rows(10**6)[0]) == N_TRAIN


def test_too_few_training_rows(index_file):
    with pytest.raises(DataError) as info:
        _dm(index_file, batch_size=4000)
    message = str(info.value)
    for fragment in (index_file, "'acts'", str(N_ROWS), str(N_TRAIN), "--data.batch_size 4000"):
        assert fragment in message, message


def test_unequal_input_and_target_rows(index_file):
    with pytest.raises(DataError, match=rf"'acts' has {N_ROWS} rows but target 'short' has {N_ROWS - 1}"):
        _dm(index_file, target_key="short")


@pytest.mark.parametrize(("flag", "value"), [("batch_size", 0), ("block_size", -1), ("val_rows", -5),
                                             ("num_workers", -1), ("norm_sample_rows", 0),
                                             ("in_memory_mib", -1)])
def test_bad_config_names_the_flag(index_file, flag, value):
    with pytest.raises(ConfigError, match=f"--data.{flag} must be"):
        _dm(index_file, **{flag: value})


def test_ddp_with_lightning_sampler_injection_refused(index_file):
    dm = _dm(index_file)
    connector = SimpleNamespace(use_distributed_sampler=True)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=connector)
    with pytest.raises(ConfigError, match="--trainer.use_distributed_sampler false"):
        dm.train_dataloader()
    connector.use_distributed_sampler = False
    loader = dm.train_dataloader()
    assert (loader.sampler.rank, loader.sampler.world_size, len(loader)) == (1, 2, N_BATCHES // 2)


def test_val_rows_zero(index_file):
    dm = _dm(index_file, val_rows=0, batch_size=BATCH)
    assert dm.n_val == 0 and dm.n_train == N_ROWS and dm.val_slices() == []
    assert dm.val_dataloader is None and dm.test_dataloader is None  # Lightning: "not defined"


def test_num_workers_matches_in_process(index_file):
    plain = _epoch(_dm(index_file).train_dataloader(), 1)[:5]
    loader = _dm(index_file, num_workers=1, target_key="target").train_dataloader()
    assert loader.num_workers == 1
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    for expected in plain:
        x, y = next(iterator)
        np.testing.assert_array_equal(x[:, 0].long().numpy(), expected)
        assert torch.equal(y[:, 0], 2 * x[:, 0])
    assert loader.state_dict() == {"consumed": 5, "epoch": 1}


def _fit(path, max_steps, tmp_path, ckpt_path=None, every=None, val_rows=VAL):
    """Fit a LightningModule that records each step's rows; checkpoint every `every` steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.rows, self.val_batches = [], 0

        def training_step(self, batch, batch_idx):
            self.rows.append(batch[0][:, 0].long().numpy())
            return (self.weight * batch[0][:, 1]).sum()

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callbacks = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(every), callbacks=callbacks, val_check_interval=10, num_sanity_val_steps=0,
    )
    model = Recorder()
    trainer.fit(model, _dm(path, val_rows=val_rows), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("crash_step", [13, N_BATCHES, N_BATCHES + 4])  # mid-epoch, boundary, epoch 1
def test_lightning_kill_and_resume_is_exact(index_file, tmp_path, crash_step):
    full = _fit(index_file, 2 * N_BATCHES + 5, tmp_path / "full").rows
    _fit(index_file, crash_step, tmp_path / "ckpt", every=crash_step)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    rest = _fit(index_file, 2 * N_BATCHES + 5, tmp_path / "resumed", checkpoint, every=crash_step).rows
    assert len(rest) == len(full) - crash_step
    assert all(np.array_equal(a, b) for a, b in zip(rest, full[crash_step:]))


def test_lightning_fit_without_validation(index_file, tmp_path, recwarn):
    model = _fit(index_file, 12, tmp_path, val_rows=0)
    assert len(model.rows) == 12 and model.val_batches == 0
    assert not [w for w in recwarn if "zero" in str(w.message)]
    assert _fit(index_file, 12, tmp_path).val_batches > 0  # the default does validate


def test_a_non_finite_held_out_row_is_named_by_its_file_row(tmp_path):
    """Held-out rows are checked in chunks of several ranges; the message names the bad file row."""
    rows = np.random.default_rng(0).standard_normal((4000, 3)).astype(np.float32)
    rows[3005, 1], rows[3007, 0] = np.inf, np.nan
    write_datasets(tmp_path / "a.h5", {"acts": rows}, {})
    dm = _dm(str(tmp_path / "a.h5"))
    dm.val_slices = lambda *args: [(100, 110), (2990, 2995), (3000, 3010)]
    with pytest.raises(DataError, match=r"held-out row 3005 \(2 bad held-out rows in \[100, 3010\)\)"):
        dm.check_heldout_finite()
    dm.val_slices = lambda *args: [(100, 110), (3008, 3010)]
    dm.check_heldout_finite()
