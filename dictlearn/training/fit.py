"""How dictionaries train, in one place: `dictlearn fit` and `dictlearn compare` both end in `train`.

- The trainer settings are `recipes/base.yaml`'s `trainer:` section: `dictlearn fit` reads it as
  LightningCLI's default config, `dictlearn compare` through `build_trainer` (its own run length,
  devices and logging on top).
- Every run has the same callbacks (`run_callbacks`): `RunGuard` (atomic checkpoints; Ctrl-C
  stops like SIGTERM at the end of the step and saves `interrupted-step=N.ckpt`),
  `ExportOnFitEnd` (the exports of a finished fit) and `KeepFreedMemory`; the progress display is
  the caller's (a bar for fit, the comparison's one line for compare).
- `train` runs the fit from a checkpoint or from scratch and turns a stop by signal into `Stopped`
  with the shell's exit code (130 Ctrl-C, 143 SIGTERM), the checkpoint already saved.
- `latest_checkpoint` is what a rerun resumes from (compare resumes by itself; fit takes
  `--ckpt_path`).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dictlearn.callbacks import ExportOnFitEnd, KeepFreedMemory, RunGuard
from dictlearn.training.recipe import base_trainer_arguments


class Stopped(Exception):
    """SIGTERM/SIGINT stopped the run (a checkpoint of the last whole step is saved when it stopped
    training). `code` is 128 + the signal number."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped by signal; rerun the same command to resume (exit {code})")
        self.code = code


def run_callbacks(guard: RunGuard, export: ExportOnFitEnd | None) -> list[L.Callback]:
    """The callbacks every training run has (a run adds its progress display, checkpointing and
    calibration); `export` None: a run whose dictionaries are not kept (compare's LR search)."""
    return [guard, *([export] if export is not None else []), KeepFreedMemory()]


def build_trainer(own: dict, *, root: Path, logger, callbacks: list[L.Callback]) -> L.Trainer:
    """A Trainer with `recipes/base.yaml`'s settings and `own` on top (run length, devices, logging
    intervals), writing under `root`, without Lightning's progress bar (the caller's is in
    `callbacks`)."""
    settings = {**base_trainer_arguments(), **own}
    return L.Trainer(**settings, enable_progress_bar=False, default_root_dir=str(root), logger=logger,
                     callbacks=callbacks)


def train(trainer: L.Trainer, module: L.LightningModule, data: L.LightningDataModule,
          ckpt_path: str | Path | None = None) -> None:
    """`trainer.fit(module, data)` from `ckpt_path` (None: from scratch). Raises `Stopped` when a
    signal stopped it; `trainer`'s callbacks must include a `RunGuard` (see `run_callbacks`)."""
    guard = next((c for c in trainer.callbacks if isinstance(c, RunGuard)), None)
    if guard is None:
        raise ValueError("train: the trainer has no RunGuard callback; build its callbacks with run_callbacks")
    try:
        trainer.fit(module, data, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
    except SIGTERMException:  # RunGuard saved interrupted-step=N.ckpt
        raise Stopped(guard.exit_code) from None
    if trainer.interrupted:
        raise Stopped(guard.exit_code)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint in `folder` with the most steps (last.ckpt or interrupted-step=N.ckpt), or None."""
    found = [(p, checkpoint_step(p)) for p in folder.glob("*.ckpt")] if folder.is_dir() else []
    return max(found, key=lambda item: item[1])[0] if found else None


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at (read lazily: mmap, no tensor copied)."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
