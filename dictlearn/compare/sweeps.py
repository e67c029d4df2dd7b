"""One seed's sweep of `dictlearn compare`, trained and exported, and a dictionary's evaluation:
what the one-process run (compare/run.py) and its worker processes (compare/workers.py) both do,
each writing whole files into the run folder (DIR/train/seed<S>/, DIR/exports/<name>/,
DIR/evaluations/<name>.json).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dictlearn.callbacks import ExportOnFitEnd, RunGuard
from dictlearn.compare.plan import SHORT_RUN_DATA, CompareConfig, Planned
from dictlearn.compare.progress import Progress, TrainingProgress
from dictlearn.data import ActivationDataModule
from dictlearn.data.h5 import H5Array
from dictlearn.data.split import HeldOutSplit
from dictlearn.export import export, load
from dictlearn.io import atomic_write_text
from dictlearn.runtime import quiet_lightning
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.calibration import SparsityCalibration
from dictlearn.training.fit import Stopped, build_trainer, checkpoint_step, latest_checkpoint, run_callbacks, train
from dictlearn.training.recipe import sweep_config, to_yaml


@dataclass
class Source:
    """The activation file and the datasets each mapping reads."""

    path: Path
    sae_keys: tuple[str, None]
    transcoder_keys: tuple[str, str] | None
    hooks: list[str] | None = None  # what to harvest (None: --data)

    def keys(self, planned: Planned) -> tuple[str, str | None]:
        return self.sae_keys if planned.mapping == "sae" else self.transcoder_keys


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


# Warnings a comparison's own checkpoint loading and log folders raise on every resume.
_RESUME_WARNINGS = (".*weights_only.*", ".*does not have many workers.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*Experiment logs directory.*")


def _check_stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise Stopped(128 + int(getattr(stop, "signum", signal.SIGTERM)))


def exported(out: Path, name: str) -> bool:
    """Whether DIR/exports/<name> is complete (an export writes its folder atomically, cfg.json in it)."""
    return (out / "exports" / name / "cfg.json").is_file()


def not_evaluated(out: Path, planned: list) -> list:
    """The entries of `planned` (anything with a `name`) without DIR/evaluations/<name>.json yet."""
    return [p for p in planned if not (out / "evaluations" / f"{p.name}.json").is_file()]


def pending_sweeps(out: Path, groups: dict[str, list], progress: Progress) -> dict[str, list]:
    """The sweeps of `groups` ({label: members}) with a member not exported yet; the members of the
    others are counted done on `progress`."""
    pending = {}
    for label, members in groups.items():
        if all(exported(out, m.name) for m in members):
            progress.done_dictionaries += len(members)
        else:
            pending[label] = members
    return pending


# ----------------------------------------------------------------------------- training
def _train_group(config: CompareConfig, source: Source, group: list[Planned], label: str, progress: Progress,
                 stop: threading.Event, extra_callbacks: tuple = ()) -> bool:
    """Train (or resume) the sweep of one seed and export its members; -> whether it trained.
    `extra_callbacks`: more for its Trainer (a worker's stop on its parent's request)."""
    out = Path(config.out)
    folder = out / "train" / label
    pending = [p for p in group if not exported(out, p.name)]
    if not pending:
        progress.done_dictionaries += len(group) if _rank() == 0 else 0
        return False
    _check_stop(stop)
    final = folder / "final.ckpt"
    trained = not final.is_file()
    if trained:  # the fit's end writes every member's export (ExportOnFitEnd), then final.ckpt
        _fit(config, source, group, folder, progress, exports=out / "exports", extra_callbacks=extra_callbacks)
    elif _rank() == 0:  # a finished sweep whose exports went missing: from its final checkpoint
        _export_from(final, pending, out)
    if _rank() == 0:
        progress.done_dictionaries += len(group)
    return trained


def _fit(config: CompareConfig, source: Source, group: list[Planned], folder: Path, progress: Progress,
         data=None, exports: Path | None = None, extra_callbacks: tuple = ()) -> None:
    """Train `group` into `folder` (resuming its checkpoints) on `data` (None: `sweep_data`) through
    the one training path (`dictlearn.training.fit`); each member exported to `exports/<name>` at the
    end (None: not exported). `extra_callbacks`: added to the Trainer's."""
    quiet_lightning(*_RESUME_WARNINGS)
    steps = config.steps
    members = {}
    for p in group:
        input_key, target_key = source.keys(p)
        d_in = H5Array(source.path, input_key).d
        d_out = d_in if target_key is None else H5Array(source.path, target_key).d
        members[p.name] = Member(p.build(d_in, d_out), input_key, target_key, seed=p.seed,
                                 training=TrainingConfig(**p.training))
    module = DictionaryTraining(members)
    data = sweep_data(config, source, group[0].seed) if data is None else data
    targets = {p.name: p.l0_target for p in group if p.calibrated}
    # compare's run length, devices and logging on top of recipes/base.yaml's trainer settings
    cuda = config.device.startswith("cuda")
    own = dict(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=config.devices,
               strategy="ddp" if config.devices > 1 else "auto", log_every_n_steps=max(1, min(50, steps // 20)),
               val_check_interval=max(1, steps // 4))
    checkpoints = dict(every_n_train_steps=max(1, steps // 10), save_top_k=0, save_last=True)
    if _rank() == 0:  # the sweep as `dictlearn fit --config DIR/train/<label>.yaml` trains it again
        folder.parent.mkdir(parents=True, exist_ok=True)
        callbacks = [{"class_path": "dictlearn.training.calibration.SparsityCalibration",
                      "init_args": {"targets": targets, **config.calibration}},
                     {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoints}]
        atomic_write_text(folder.parent / f"{folder.name}.yaml", to_yaml(
            sweep_config(members, dict(data.hparams), own, callbacks, group[0].seed)))
    export = ExportOnFitEnd(exports, echo=False) if exports is not None else None
    callbacks = [*run_callbacks(RunGuard(), export), SparsityCalibration(targets, **config.calibration),
                 TrainingProgress(progress, config.batch_size * len(group)),
                 ModelCheckpoint(dirpath=folder / "checkpoints", **checkpoints), *extra_callbacks]
    logger = CSVLogger(save_dir=str(folder.parent), name=folder.name, version=0)
    trainer = build_trainer(own, root=folder, logger=logger, callbacks=callbacks)
    resume = latest_checkpoint(folder / "checkpoints")
    if resume is not None:
        progress.note(f"{folder.name}: resuming from {resume.name}")
    progress.stage(f"train {folder.name}", steps - (checkpoint_step(resume) if resume is not None else 0))
    started = time.perf_counter()
    try:
        train(trainer, module, data, resume)
    finally:
        _add_seconds(folder, time.perf_counter() - started)
    trainer.save_checkpoint(folder / "final.ckpt")  # atomic (RunGuard's checkpoint IO), all ranks join


VALIDATION_ROWS = 4096  # rows of held-out documents the sweeps validate on (4 times each)


def sweep_data(config: CompareConfig, source: Source, seed: int):
    """The data module of one seed's sweep. The seed sets the data order as well as the initial
    weights: every architecture of a seed reads the same batches (so differences pair by seed), and
    the spread over seeds includes the data's, not only the initialisation's."""
    # Validation here only draws the training curves: with held-out documents, their first
    # VALIDATION_ROWS rows do (training never reads any held-out row either way). A tail split holds
    # out evaluate's tail (its default 512-row blocks) whatever the short run's block size, so the
    # rows evaluate scores are never trained on.
    split = HeldOutSplit.from_file(str(source.path), H5Array(source.path, source.sae_keys[0]).n_rows)
    val_rows = min(VALIDATION_ROWS, split.n_val) if split.kind == "documents" else split.n_val
    return ActivationDataModule(str(source.path), input_key=source.sae_keys[0], batch_size=config.batch_size,
                                seed=seed, val_rows=val_rows, **SHORT_RUN_DATA)  # block_size: recipes/short_run.yaml


def _add_seconds(folder: Path, seconds: float) -> None:
    """The sweep's training wall time summed over the invocations that ran it."""
    if _rank() != 0:
        return
    path = folder / "train_seconds.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    atomic_write_text(path, json.dumps({"seconds": total + seconds}))


def _export_from(checkpoint: Path, pending: list[Planned], out: Path) -> None:
    """Each pending member of a finished sweep's final checkpoint -> DIR/exports/<name> (atomic)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["dictlearn_members"]
    for p in pending:
        export(load(checkpoint, member=p.name), out / "exports" / p.name, saved[p.name].get("data", {}))


# ----------------------------------------------------------------------------- evaluation and results
def evaluate_options(config: CompareConfig):
    """How every dictionary of the run is evaluated (its own members and included ones alike)."""
    from dictlearn.evaluate import EvaluateOptions

    return EvaluateOptions(contexts=config.contexts, device=config.device, downstream=config.downstream,
                           interpret=config.interpret, feature_density=True)  # the density figure reads it


class Evaluation:
    """Evaluates the run's dictionaries one call at a time into DIR/evaluations/<name>.json, with
    caches shared between calls (the language model and held-out batches, probe rows and baselines)."""

    def __init__(self, config: CompareConfig, source: Source, cache=None) -> None:
        from dictlearn.downstream import DownstreamCache
        from dictlearn.metrics.concepts import ProbeCache

        self.out, self.data, self.options = Path(config.out), source.path, evaluate_options(config)
        self.cache = cache if cache is not None else DownstreamCache(config.device)
        self.probes = ProbeCache()  # probe rows and baselines: once per file

    def __call__(self, p: Planned) -> None:
        from dictlearn.evaluate import evaluate

        record = evaluate([self.out / "exports" / p.name], self.data, options=self.options, cache=self.cache,
                          probes=self.probes)[0]
        atomic_write_text(self.out / "evaluations" / f"{p.name}.json", json.dumps(record, default=str))
