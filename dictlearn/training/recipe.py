"""The trainer settings every run shares, in one place: `recipes/base.yaml`'s `trainer:` section.

`dictlearn fit` starts from that file (LightningCLI's default config); `dictlearn compare` builds
its Trainer from the same section (`base_trainer_arguments`) with its own run length, devices and
logging on top, and writes each sweep as a config `dictlearn fit` reads (`sweep_config`), so
`dictlearn fit --config DIR/train/seed0.yaml` trains that sweep again.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

import dictlearn.recipes

BASE_RECIPE = Path(dictlearn.recipes.__file__).resolve().parent / "base.yaml"
#: what a run supplies itself rather than from the base recipe
_RUN_OWN = ("callbacks", "logger", "enable_progress_bar")


def base_trainer_arguments() -> dict:
    """`recipes/base.yaml`'s `trainer:` as `lightning.Trainer` keyword arguments, without the
    callbacks, logger and progress bar a run supplies itself."""
    trainer = yaml.safe_load(BASE_RECIPE.read_text())["trainer"]
    return {key: value for key, value in trainer.items() if key not in _RUN_OWN}


def sweep_config(members: dict, data: dict, trainer: dict, callbacks: list[dict], seed: int) -> dict:
    """A config `dictlearn fit --config` reads: {name: Member} `members` (their dictionaries'
    classes and constructor arguments, keys, seeds, training), the data module's arguments `data`,
    the trainer settings beyond the base recipe's `trainer`, `callbacks` as {class_path, init_args}."""
    sweep = {}
    for name, member in members.items():
        cls = type(member.dictionary)
        args = {k: v for k, v in member.dictionary.hparams.items() if k not in ("d_in", "d_out")}  # read from the file
        sweep[name] = {"dictionary": {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args},
                       "input_key": member.input_key, "target_key": member.target_key, "seed": member.seed,
                       "training": {k: v for k, v in asdict(member.training).items() if v is not None}
                       if member.training is not None else None}
    return {"seed_everything": seed, "trainer": {**trainer, "callbacks": callbacks}, "data": data, "sweep": sweep}


def to_yaml(config: dict) -> str:
    """`config` as YAML (tuples as lists)."""
    return yaml.safe_dump(_plain(config), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
