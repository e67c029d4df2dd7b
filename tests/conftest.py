"""Shared fixtures: small synthetic activation files and a quiet Lightning trainer."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from dictlearn.training import DictionaryTraining, Member
from dictlearn.data import write_synth_file

torch.set_num_threads(2)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


@pytest.fixture(scope="session")
def synth_files(tmp_path_factory):
    """The core issue's ground-truth setting: 256 true features in d = 64, mean 4 active, with
    exponential or uniform [0, 2] magnitudes (mean 1). -> {magnitude: path}."""
    folder = tmp_path_factory.mktemp("synth")
    paths = {}
    for magnitude in ("exponential", "uniform"):
        paths[magnitude] = str(folder / f"{magnitude}.h5")
        write_synth_file(paths[magnitude], n_rows=200_000, d=64, n_features=256, mean_active=4.0,
                         magnitude=magnitude, seed=0)
    return paths


@pytest.fixture(scope="session")
def small_file(tmp_path_factory):
    """A small synthetic file for quick mechanics tests (d = 16, 32 features)."""
    path = tmp_path_factory.mktemp("small") / "small.h5"
    write_synth_file(path, n_rows=8192, d=16, n_features=32, mean_active=3.0, seed=1)
    return str(path)


@pytest.fixture(scope="session")
def small_tc_file(tmp_path_factory):
    """A small transcoder file: d_in 16 -> d_out 12 (key 'target'), with a dense linear part so a
    skip connection has something to learn."""
    path = tmp_path_factory.mktemp("small_tc") / "tc.h5"
    write_synth_file(path, n_rows=8192, d=16, n_features=32, mean_active=3.0, seed=1, d_out=12, dense_linear=1.0)
    return str(path)


def fit_recipe(recipe: str, data_path: str, root: Path, *flags: str, steps: int = 20) -> tuple[dict, Path]:
    """`dictlearn fit --config recipes/<recipe>.yaml` on `data_path` (key 'acts', 256 tokens per
    step) for `steps` steps, logging under `root`; later `flags` override these.
    -> (the run's export cfg.json, its export folder)."""
    from dictlearn.cli import RECIPES_DIR, main

    code = main([
        "fit", "--config", str(RECIPES_DIR / f"{recipe}.yaml"), "--data.path", data_path,
        "--data.input_key", "acts", "--data.batch_size", "256", "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *flags,
    ])  # fmt: skip
    assert code == 0
    exports = list(Path(root).rglob("export/cfg.json"))
    assert len(exports) == 1
    return json.loads(exports[0].read_text()), exports[0].parent


def fit_and_score(make, path: str, steps: int = 2000, target_key: str | None = None,
                  features_key: str = "features") -> tuple[float, dict, float]:
    """Seed 0, build `make()` (a Dictionary or a Member with its training), train it on `path` at
    batch 1024 for `steps` steps, validate.
    -> (MMCS of its decoder against the file's true `features_key`, val metrics, CPU s)."""
    import time

    import h5py

    from dictlearn import ActivationDataModule
    from dictlearn.metrics import mmcs

    L.seed_everything(0)
    spec = make()
    model = spec.dictionary if isinstance(spec, Member) else spec
    data = ActivationDataModule(path, batch_size=1024, target_key=target_key)
    trainer = quiet_trainer(max_steps=steps)
    start = time.process_time()
    training = DictionaryTraining(spec)
    trainer.fit(training, data)
    cpu_seconds = time.process_time() - start
    metrics = trainer.validate(training, data, verbose=False)[0]
    with h5py.File(path) as f:
        score = mmcs(torch.from_numpy(f[features_key][:]), model.W_dec.detach())
    return score, metrics, cpu_seconds


def initialise(model, data, **training) -> None:
    """The data-dependent start of `model` on `data` under the training settings `training`
    (`TrainingConfig` fields, resolved as a run resolves them)."""
    from dictlearn.training.config import TrainingConfig, resolve
    from dictlearn.training.initialise import initialise_from_data

    initialise_from_data(model, data, resolve(model, TrainingConfig(**training)))


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer without logger, progress bar or checkpoints unless asked for."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, gradient_clip_val=1.0,
    )
    return L.Trainer(**(defaults | kwargs))


class _Crash(L.Callback):
    """Raises at the start of step `at`, as a killed run would stop."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("injected crash")


def crash_and_resume(make_model, data_path: str, folder: Path, *, steps: int, checkpoint_every: int,
                     crash_at: int, resume_step: int, callbacks=(), data_kwargs=None) -> tuple:
    """Trains `make_model()` (seeded; a Dictionary, a Member or a DictionaryTraining) for `steps` steps of 256 tokens with a checkpoint every
    `checkpoint_every`; trains it again, crashing at step `crash_at`; resumes that run from its
    checkpoint at `resume_step`. `callbacks` join the reference run only; `data_kwargs` go to
    the data module (keys).
    -> (reference, resumed: the Dictionary, or the DictionaryTraining when make_model gave a Member
    or one; the checkpoint's path)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dictlearn import ActivationDataModule
    from dictlearn.callbacks import RunGuard

    def fit(run_folder: Path, extra=(), ckpt_path=None):
        L.seed_everything(0)
        model = make_model()
        checkpoint = ModelCheckpoint(dirpath=run_folder, every_n_train_steps=checkpoint_every, save_top_k=-1)
        trainer = quiet_trainer(max_steps=steps, enable_checkpointing=True, callbacks=[checkpoint, RunGuard(), *extra])
        training = model if isinstance(model, DictionaryTraining) else DictionaryTraining(model)
        data = ActivationDataModule(data_path, batch_size=256, block_size=64, **(data_kwargs or {}))
        trainer.fit(training, data, ckpt_path=ckpt_path)
        return training if isinstance(model, Member) else model

    reference = fit(Path(folder) / "reference", callbacks)
    with pytest.raises(RuntimeError, match="injected crash"):
        fit(Path(folder) / "crashed", [_Crash(crash_at)])
    checkpoint = Path(folder) / "crashed" / f"epoch=0-step={resume_step}.ckpt"
    assert checkpoint.is_file()
    return reference, fit(Path(folder) / "crashed", ckpt_path=str(checkpoint)), checkpoint


def assert_same_state(reference, resumed) -> None:
    """Every parameter and buffer bit-identical."""
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"


@pytest.fixture(scope="session")
def transcoder_recovery_files(tmp_path_factory):
    """Transcoder ground truth for recovery: 128 true features in d = 64 (2x overcomplete), mean 4
    active, target from the same codes through a second dictionary (d_out = 64). -> {magnitude: path}.

    Why not the SAE setting's 256 features: x = F c loses what c holds in the null space of F
    (256 codes in 64 dimensions), which costs an SAE nothing but a transcoder everything, since
    y = G c needs those parts too; at 4x overcompleteness every mechanism's transcoder stops near
    FVU 0.11-0.16 with MMCS 0.99 (benchmarks/RESULTS.md, "Feature recovery: JumpReLU and transcoders", has the numbers)."""
    folder = tmp_path_factory.mktemp("transcoder_recovery")
    paths = {}
    for magnitude in ("exponential", "uniform"):
        paths[magnitude] = str(folder / f"{magnitude}.h5")
        write_synth_file(paths[magnitude], n_rows=200_000, d=64, n_features=128, mean_active=4.0,
                         magnitude=magnitude, seed=0, d_out=64)
    return paths


@pytest.fixture(scope="session")
def transcoder_files(tmp_path_factory):
    """Transcoder ground truth: input as in `synth_files`, target from the same codes through a
    second dictionary (d_out = 64); with a dense linear part (dense_linear 1.0) or without.
    -> {(magnitude, dense_linear): path}."""
    folder = tmp_path_factory.mktemp("transcoder")
    paths = {}
    for magnitude, dense_linear in (("exponential", 0.0), ("uniform", 0.0), ("exponential", 1.0)):
        path = str(folder / f"{magnitude}_{dense_linear}.h5")
        write_synth_file(path, n_rows=200_000, d=64, n_features=256, mean_active=4.0, magnitude=magnitude,
                         seed=0, d_out=64, dense_linear=dense_linear)
        paths[magnitude, dense_linear] = path
    return paths


def assert_one_line_cli_error(code: int, capsys, words, untouched: Path) -> None:
    """A CLI call that refused: exit 2, one `dictlearn: error:` line holding each of `words`, and
    `untouched` never created."""
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("dictlearn: error: "), error
    for word in words:
        assert word in error, error
    assert not untouched.exists()
