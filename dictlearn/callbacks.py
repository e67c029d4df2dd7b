"""Lightning callbacks that make a run safe to stop and its outputs whole.

- `RunGuard`: checkpoints written atomically; SIGINT handled like SIGTERM (stop at the end of the
  step, save `interrupted-step=N.ckpt`, exit non-zero); a run that fails on bad input before any
  checkpoint leaves no log folder behind (nor the `default_root_dir` folders it created).
- `ExportOnFitEnd`: the finished run writes its SAELens-layout exports (into its log folder, or a
  folder given: compare's `DIR/exports`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from dictlearn.errors import ConfigError, DictLearnError
from dictlearn.export import export
from dictlearn.io import atomic_path
from dictlearn.runtime import keep_freed_memory

# Files Lightning and LightningCLI write into a fresh version folder before the first checkpoint.
_RUN_BOOKKEEPING = {"config.yaml", "hparams.yaml", "metrics.csv", "checkpoints"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp name in the checkpoint's folder, fsync, os.replace: a killed save never looks whole (docs/conventions.md#reliability)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class RunGuard(L.Callback):
    """Atomic checkpoints, graceful SIGINT/SIGTERM, and no half-made run folder on bad input."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous_sigint = None
        self._created_folders: list[Path] = []

    def note_root(self, root: Path) -> None:
        """Record which of `root` and its parents do not exist yet (called before the run starts)."""
        root = Path(root).absolute()
        self._created_folders = [p for p in (root, *root.parents) if not p.exists()]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_received = None
        self._previous_sigint = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._connector = trainer._signal_connector  # its received_sigterm flag stops the loop

    def _on_sigint(self, signum, frame) -> None:
        self.request_stop(signal.SIGINT)

    def request_stop(self, signum: int) -> None:
        """Stop as for signal `signum` (a SIGINT, or a compare worker asked by its parent)."""
        # At the end of the current step, exactly as Lightning does for SIGTERM, so the
        # checkpoint holds a consistent optimiser state.
        self.signal_received = signum
        self._connector.received_sigterm = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            if self.signal_received is None:
                self.signal_received = signal.SIGTERM if isinstance(exception, SIGTERMException) else signal.SIGINT
            if trainer.state.fn == "fit":
                _end_finished_epoch(trainer)
                trainer.save_checkpoint(self.interrupt_checkpoint_path(trainer))
        elif user_error(exception) is not None:
            _remove_fresh_run_folder(trainer, self._created_folders)

    @staticmethod
    def interrupt_checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        run_folder = _log_dir(trainer) or trainer.default_root_dir
        folder = getattr(callback, "dirpath", None) or Path(run_folder) / "checkpoints"
        return Path(folder) / f"interrupted-step={trainer.global_step}.ckpt"

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell's convention for a process stopped by a signal."""
        return 128 + int(self.signal_received or signal.SIGTERM)


def user_error(exception: BaseException) -> DictLearnError | None:
    """The one-line error to report for `exception`: itself when it is a DictLearnError; a
    ConfigError when memory ran out (torch's CPU allocator raises a RuntimeError, CUDA an
    OutOfMemoryError) or when Lightning refuses a --trainer setting once the run starts (its
    sentence, e.g. "`val_check_interval` (500) must be less than or equal to the number of the
    training batches (76)"); else None (a bug: the traceback is the report)."""
    if isinstance(exception, DictLearnError):
        return exception
    if isinstance(exception, MisconfigurationException) or (
        isinstance(exception, ValueError) and _raised_in(exception, f"{os.sep}lightning{os.sep}")
    ):
        return ConfigError(f"--trainer: {' '.join(str(exception).split())}")
    text = str(exception)
    if isinstance(exception, MemoryError) or (
        isinstance(exception, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        asked = re.search(r"tried to allocate ([\d.]+ ?\w+)", text, re.IGNORECASE)
        size = f" (an allocation of {asked.group(1)} failed)" if asked else ""
        return ConfigError(f"out of memory{size}; lower --model.d_sae or --data.batch_size")
    return None


def _raised_in(exception: BaseException, path_part: str) -> bool:
    """Whether the innermost frame of `exception`'s traceback is in a file whose path has `path_part`."""
    tb = exception.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and path_part in tb.tb_frame.f_code.co_filename


def _log_dir(trainer: L.Trainer) -> str | None:
    """`trainer.log_dir` without its broadcast from rank 0.

    That broadcast is a collective: under DDP, rank 0 asking alone (rank-0-only code, or a rank
    failing on its own) waits for the other ranks, which have moved on, and dies with gloo's
    "Connection closed by peer". Same choice of folder as Lightning; the value is rank 0's.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return logger.log_dir if isinstance(logger, (CSVLogger, TensorBoardLogger)) else logger.save_dir


def _remove_fresh_run_folder(trainer: L.Trainer, created_folders: Iterable[Path] = ()) -> None:
    """Delete this run's log folder if it holds nothing but Lightning's bookkeeping and no checkpoint.

    Then remove `created_folders` (deepest first: the run's root and parents it made) left empty.
    """
    log_dir = _log_dir(trainer)
    if not trainer.is_global_zero or log_dir is None:
        return
    folder = Path(log_dir)
    if not folder.is_dir() or not folder.name.startswith("version_"):
        return
    entries = {p.name for p in folder.iterdir()}
    checkpoints = folder / "checkpoints"
    if entries <= _RUN_BOOKKEEPING and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        shutil.rmtree(folder, ignore_errors=True)
        parent = folder.parent  # lightning_logs/, if this run created it and it is now empty
        if parent.is_dir() and not any(parent.iterdir()):
            os.rmdir(parent)
        for created in created_folders:
            if created.is_dir() and not any(created.iterdir()):
                os.rmdir(created)


class RunProgress(ProgressBar):
    """Progress over the whole run (rank 0): step / max_steps, tokens/s and, for one dictionary,
    the latest logged train fvu and l0 (every `log_every_n_steps`). Validation shows none.

    On a terminal: one tqdm bar. Otherwise (stderr sent to a file or a pipe) a bar would write a
    redraw every step (157 KB for a 600-step quickstart), so a plain line is printed every 10 % of
    the run or every 30 s, whichever comes first."""

    PLAIN_FRACTION, PLAIN_SECONDS = 0.1, 30.0

    def __init__(self, terminal: bool | None = None) -> None:
        """terminal: draw a bar (True) or print plain lines (False); None: a bar when stderr is a TTY."""
        super().__init__()
        self._bar, self._enabled, self._terminal = None, True, terminal
        self._plain = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self._total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        terminal = sys.stderr.isatty() if self._terminal is None else self._terminal
        if not terminal:
            self._plain, self._printed_step, self._printed_at = True, trainer.global_step, self._start
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self._total, initial=trainer.global_step, unit="step", desc="dictlearn fit",
                         dynamic_ncols=True, file=sys.stderr, leave=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None and not self._plain:
            return
        step, now = trainer.global_step, time.perf_counter()
        postfix = self._postfix(trainer, pl_module, len(batch[0]), step, now)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(postfix, refresh=False)
        elif self._plain_line_due(step, now):
            self._printed_step, self._printed_at = step, now
            total = f"/{self._total:,} ({100 * step / self._total:.0f} %)" if self._total else ""
            fields = ", ".join(f"{key} {value}" for key, value in postfix.items())
            print(f"dictlearn fit: step {step:,}{total}, {fields}", file=sys.stderr, flush=True)

    def _plain_line_due(self, step: int, now: float) -> bool:
        """True at the last step, every PLAIN_FRACTION of max_steps and every PLAIN_SECONDS."""
        if self._total and (step >= self._total or step - self._printed_step >= self.PLAIN_FRACTION * self._total):
            return True
        return now - self._printed_at >= self.PLAIN_SECONDS

    def _postfix(self, trainer, pl_module, batch_rows: int, step: int, now: float) -> dict[str, str]:
        steps, seconds = step - self._start_step, now - self._start
        postfix = {"tokens/s": f"{steps * batch_rows * trainer.world_size / max(seconds, 1e-9):,.0f}"}
        members = getattr(pl_module, "members", {})
        if len(members) == 1:
            for key in ("train/fvu", "train/l0"):
                if key in trainer.callback_metrics:
                    postfix[key[6:]] = f"{float(trainer.callback_metrics[key]):.3g}"
        else:
            postfix["dictionaries"] = str(len(members))
        return postfix

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Only close the display: the exception itself is reported by the CLI (one line) or
        # handled by RunGuard (a signal); a hook with the wrong signature here once hid both.
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._plain = False


class KeepFreedMemory(L.Callback):
    """Applies `dictlearn.runtime.keep_freed_memory` when training starts, after the data-dependent
    initialisation: its one-off temporaries (a 32k-row sample, the geometric median) are still
    returned to the kernel. Applied from the process start, they stayed in the heap and lifted a
    standard TopK run's peak RSS growth from ~210 to 236–620 MiB; from here it stays at ~210."""

    def on_train_start(self, trainer, pl_module) -> None:
        keep_freed_memory()


class ExportOnFitEnd(L.Callback):
    """At the end of a completed fit, write each dictionary's export (rank 0): `<log_dir>/export`
    for a single dictionary, `<log_dir>/exports/<name>` for each member of a sweep; with `folder`
    given, `<folder>/<name>` for every member (compare's `DIR/exports/<name>`). `echo`: print where."""

    def __init__(self, folder: str | Path | None = None, echo: bool = True) -> None:
        self.folder, self.echo = (Path(folder) if folder is not None else None), echo

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        single = len(pl_module.members) == 1 and self.folder is None
        log_dir = Path(_log_dir(trainer) or trainer.default_root_dir)
        root = self.folder if self.folder is not None else log_dir / ("export" if single else "exports")
        datamodule = trainer.datamodule
        for name, member in pl_module.members.items():
            view = datamodule.view(*pl_module.data_keys(name, datamodule)) if hasattr(datamodule, "view") else None
            export(member, root if single else root / name, view.provenance() if view is not None else {})
        if self.echo:
            noun = "export" if single else f"{len(pl_module.members)} exports"
            print(f"dictlearn: {noun} written to {root}")


class DownstreamMetricsCallback(L.Callback):
    """Log the spliced-model metrics (`val/ce_loss_recovered`, `val/kl_div`, ...) during validation.

    At most once every `every_n_steps` training steps, at the end of a validation run, each
    dictionary is spliced into the language model its training file was harvested from (the file's
    `model_name`, `hook_name`/`hook_name_out`, `corpus`, `context_size`; `model`/`corpus` override)
    on the first `contexts` held-out corpus windows — what `dictlearn evaluate` measures
    (docs/evaluate.md), on fewer windows; a sweep logs `<member>/val/...`. Every rank computes the
    same values. A file that records no model disables the callback with a warning.

        trainer:
          callbacks:
            - class_path: dictlearn.callbacks.DownstreamMetricsCallback
              init_args: {every_n_steps: 1000, contexts: 16}
    """

    def __init__(self, every_n_steps: int = 1000, contexts: int = 16, batch_size: int = 8,
                 model: str | None = None, corpus: str | None = None, mean_sample_rows: int = 65_536) -> None:
        self.every_n_steps, self.contexts, self.batch_size = every_n_steps, contexts, batch_size
        self.model, self.corpus, self.mean_sample_rows = model, corpus, mean_sample_rows
        self._last_step: int | None = None
        self._prepared: dict | None = None  # member name -> dictlearn.downstream.SplicedInputs
        self._disabled = False

    @staticmethod
    def _members(pl_module: L.LightningModule) -> dict:
        """{name: dictionary}: a DictionaryTraining's members, else {"": the module itself}."""
        members = getattr(pl_module, "members", None)
        return dict(members.items()) if members is not None else {"": pl_module}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        due = self._last_step is None or step - self._last_step >= self.every_n_steps
        if trainer.sanity_checking or self._disabled or not due:
            return
        if self._prepared is None and not self._prepare(trainer, pl_module):
            return
        self._last_step = step
        stage = "test" if trainer.testing else "val"
        for name, dictionary in self._members(pl_module).items():
            metrics, _ = self._prepared[name].run(dictionary)
            prefix = pl_module.prefix(name) if hasattr(pl_module, "prefix") else ""
            pl_module.log_dict({f"{prefix}{stage}/{key}": value for key, value in metrics.items()})

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Load the model, the windows and the mean activations once (`dictlearn.downstream.prepare`,
        as `dictlearn evaluate`); False (disabled) without a model."""
        from dictlearn.downstream import DownstreamCache, SpliceSite, prepare

        datamodule = trainer.datamodule
        attrs = datamodule.provenance() if hasattr(datamodule, "provenance") else {}
        name = self.model or attrs.get("model_name")
        if not name:
            import warnings

            warnings.warn("DownstreamMetricsCallback: the data file records no model_name and no model was given; "
                          "downstream metrics are not logged")
            self._disabled = True
            return False
        cache = DownstreamCache(str(pl_module.device))  # one model and one set of windows for all members
        lm, prepared = cache.model(name), {}
        for member, dictionary in self._members(pl_module).items():
            view = datamodule
            if hasattr(pl_module, "data_keys") and hasattr(datamodule, "view"):
                view = datamodule.view(*pl_module.data_keys(member, datamodule))
            member_attrs = view.provenance() if hasattr(view, "provenance") else attrs
            site = SpliceSite.from_metadata(member_attrs.get("hook_name"), member_attrs.get("hook_name_out"),
                                            dictionary.transcoder)
            targets = view.sample_rows(self.mean_sample_rows)[1]
            prepared[member] = prepare(lm, site, member_attrs, targets, contexts=self.contexts,
                                       batch_size=self.batch_size, corpus=self.corpus, cache=cache)
        self._prepared = prepared
        return True


def _end_finished_epoch(trainer: L.Trainer) -> None:
    """A stop after an epoch's last batch is raised at the epoch's end, when the fit loop has
    counted the epoch complete but the batch counters still hold its batches; restored as they
    are, Lightning takes the next epoch as already run and skips its data (a resumed run differed
    from an uninterrupted one: `tests/test_resume.py`). Clearing the epoch's batch counters (their
    totals stay) makes the restored run start the next epoch at its first batch, where the data
    loader's state (`ResumableLoader`: the finished epoch's batches consumed) already points."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if trainer.num_training_batches and progress.current.ready >= trainer.num_training_batches:
        progress.reset_on_run()
