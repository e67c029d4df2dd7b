"""What `dictlearn compare` will do: flags and YAML -> one resolved `CompareConfig` -> the dictionaries.

Every choice is a field of `CompareConfig` (a flag of `dictlearn compare` and a key of its YAML
file, same name with `-` for `_`). Fields left None get a default that depends on the device:
a CPU budget that finishes in minutes on 2 cores, a larger one on a GPU. The resolved config is
what `DIR/compare.yaml` holds; two configs describe the same comparison when they agree on every
field but the ones in `RUNTIME_FIELDS` (where and how fast it runs, not what it computes).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import dictlearn.recipes
from dictlearn.compare.scan import SCAN_ARCHITECTURES, SCAN_L0
from dictlearn.errors import ConfigError

MAPPINGS = {"": "sae", "_transcoder": "transcoder", "_skip_transcoder": "skip_transcoder"}
DEFAULT_ARCHITECTURES = ("relu_l1", "topk", "batchtopk", "gated", "jumprelu", "topk_transcoder",
                         "topk_skip_transcoder")

# Defaults by device kind. CPU: measured on a 2-core AMD EPYC (AVX2, ~85 GFLOP/s fp32) shared
# with other jobs, 42 dictionaries of d_sae 512 at ~20-40 ms per member-step (docs/compare.md).
DEFAULTS = {
    "cpu": dict(tokens=250_000, train_tokens=307_200, d_sae=(512,), l0=(8, 16, 32), batch_size=1024, contexts=32),
    "cuda": dict(tokens=2_000_000, train_tokens=8_000_000, d_sae=(2048,), l0=(8, 16, 32, 64), batch_size=4096,
                 contexts=64),
}
# The short runs' training, for every architecture alike: recipes/short_run.yaml says why these
# values. OPTIMIZER: the optimiser's keys (a compare YAML's `optimizer:` overrides them); SHORT_RUN:
# the rest. Each mechanism adds its own constructor arguments (`Mechanism.short_run`, `.short_run_steps`).
# SHORT_RUN_DATA: the recipe's `data:` keys, given to every sweep's ActivationDataModule.
SHORT_RUN_RECIPE = Path(dictlearn.recipes.__file__).resolve().parent / "short_run.yaml"
_OPTIMIZER_KEYS = ("lr", "adam_betas", "adam_eps", "lr_warmup_fraction", "lr_decay_fraction")
_SHORT_RUN_RECIPE = yaml.safe_load(SHORT_RUN_RECIPE.read_text())
_SHORT_RUN_TRAINING = _SHORT_RUN_RECIPE["training"]
SHORT_RUN_DATA = dict(_SHORT_RUN_RECIPE.get("data") or {})
OPTIMIZER = {key: _SHORT_RUN_TRAINING[key] for key in _OPTIMIZER_KEYS}
SHORT_RUN = {key: value for key, value in _SHORT_RUN_TRAINING.items() if key not in _OPTIMIZER_KEYS}
RUNTIME_FIELDS = ("out", "device", "quiet", "workers")
# --tune-lr's default grid: the common LR times these (steps of about half a decade, spanning one
# decade around it; three values keep the search at a third of the comparison's training)
LR_FACTORS = (1 / 3, 1, 3)
# Outside dictionaries are evaluated, not trained: a finished comparison takes new ones on a rerun
# with the same --out (dictlearn/compare/include.py), so they are not part of its identity.
ADDED_FIELDS = ("include",)


@dataclass
class CompareConfig:
    """Everything `dictlearn compare` needs; None means "the device's default" (see DEFAULTS)."""

    out: str = "compare_run"
    # harvest (ignored with `data`)
    model: str | None = None
    corpus: str | None = None
    layer: int | None = None
    tokens: int | None = None
    context: int | None = None
    # or an existing activation file
    data: str | None = None
    input_key: str | None = None
    target_key: str | None = None
    # the dictionaries
    architectures: list[str] | None = None  # None: DEFAULT_ARCHITECTURES (SAEs only for --data without a target)
    l0: list[int] | str | None = None  # "scan": SCAN_L0 (dictlearn/compare/scan.py), then l0_scan is true
    l0_scan: bool = False  # write DIR/l0_scan.json (the indicated L0 per architecture)
    d_sae: list[int] | None = None
    # three seeds: the fewest a paired t-test over seeds can use with a useful power (docs/compare.md)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train_tokens: int | None = None
    batch_size: int | None = None
    optimizer: dict = field(default_factory=dict)  # OPTIMIZER keys, the same for every architecture
    dictionary: dict[str, dict] = field(default_factory=dict)  # mechanism -> constructor overrides
    calibration: dict = field(default_factory=dict)  # SparsityCalibration arguments
    # a per-architecture learning-rate search on validation documents (dictlearn/compare/tune.py)
    tune_lr: bool = False
    lr_grid: list[float] | None = None  # the LRs it tries; None: the common LR x 1/3, 1, 3
    # evaluation
    downstream: bool = True
    interpret: bool = True
    contexts: int | None = None
    # dictionaries trained elsewhere, evaluated and drawn beside the run's (`PATH` or `NAME=PATH`)
    include: list[str] = field(default_factory=list)
    # "mlp": replace every MLP at once and compare whole replacements at matched total L0
    # (dictlearn/compare/replace.py); None: the single-site comparison
    replace: str | None = None
    # where it runs
    device: str = "auto"
    devices: int = 1
    # processes that train the seeds' sweeps and evaluate the dictionaries side by side
    # (dictlearn/compare/workers.py); None: one per seed on a CPU (at most two per core), 1 on a GPU
    workers: int | None = None
    quiet: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict:
        """The fields a YAML file sets (a mapping of field names), checked for unknown keys."""
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"--config {path}: cannot read it ({error.__class__.__name__}); pass a YAML file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of compare options, e.g. `l0: [8, 16]`")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"--config {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return loaded

    def resolved(self) -> CompareConfig:
        """A copy with the device concrete and every None default filled in, checked."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kind = "cuda" if device.startswith("cuda") else "cpu"
        values = dataclasses.asdict(self) | {"device": device}
        if values["replace"] is not None:  # its own defaults and checks (dictlearn/compare/replace.py)
            from dictlearn.compare import replace

            values = replace.resolved_values(values, kind)
        if values["l0"] == "scan":
            values |= {"l0": list(SCAN_L0[kind]), "l0_scan": True}
            values["architectures"] = values["architectures"] or list(SCAN_ARCHITECTURES)
        for name, default in DEFAULTS[kind].items():
            if values[name] is None:
                values[name] = list(default) if isinstance(default, tuple) else default
        if values["workers"] is None:
            values["workers"] = default_workers(kind, len(values["seeds"] or [0]), values["replace"], values["devices"])
        if values["architectures"] is None:
            sae_only = self.data is not None and self.target_key is None
            values["architectures"] = [a for a in DEFAULT_ARCHITECTURES if not (sae_only and "transcoder" in a)]
        values["architectures"] = [a.strip() for a in values["architectures"] if a.strip()]
        if isinstance(values["lr_grid"], list):  # YAML 1.1 reads 3e-4 (no dot) as a string
            values["lr_grid"] = [_number(v) for v in values["lr_grid"]]
        if values["tune_lr"] and values["lr_grid"] is None:
            lr = {**OPTIMIZER, **values["optimizer"]}["lr"]
            values["lr_grid"] = [lr * factor for factor in LR_FACTORS]
        if isinstance(values["include"], str):  # `include: a,b` in a YAML file, as the flag takes it
            values["include"] = [p.strip() for p in values["include"].split(",") if p.strip()]
        config = CompareConfig(**values)
        config.check()
        return config

    def identity(self) -> dict:
        """The fields that decide what is computed (two runs with equal identities are one comparison)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS + ADDED_FIELDS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    # ----------------------------------------------------------------- checks (one line each)
    def check(self) -> None:
        self._check_workers()
        if self.replace is not None:
            from dictlearn.compare import replace

            return replace.check_config(self)
        for name in self.architectures:
            parse_architecture(name)
        if not self.architectures:
            raise ConfigError("--architectures: none given; e.g. --architectures topk,relu_l1")
        if len(set(self.architectures)) != len(self.architectures):
            raise ConfigError("--architectures: an architecture is named twice; give each once")
        for flag, values in (("--l0", self.l0), ("--d-sae", self.d_sae)):
            if not isinstance(values, list) or not values or any(
                    isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                scan = " or --l0 scan" if flag == "--l0" else ""
                raise ConfigError(f"{flag} {_join(values)}: give positive whole numbers, e.g. {flag} 8,16,32{scan}")
        smallest = min(self.d_sae)
        for target in self.l0:
            if target >= smallest:
                raise ConfigError(f"--l0 {target}: an L0 target must be below d_sae ({smallest}); lower --l0 "
                                  "or raise --d-sae")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--seeds: give distinct whole numbers, e.g. --seeds 0,1,2")
        for flag, value in (("--tokens", self.tokens), ("--train-tokens", self.train_tokens),
                            ("--batch-size", self.batch_size), ("--contexts", self.contexts),
                            ("--devices", self.devices)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{flag} {value}: must be a positive whole number")
        if self.train_tokens < self.batch_size * self.devices:
            raise ConfigError(f"--train-tokens {self.train_tokens} is less than one step (--batch-size "
                              f"{self.batch_size} x --devices {self.devices}); raise --train-tokens or lower --batch-size")
        if self.data is None and (self.input_key or self.target_key):
            raise ConfigError("--input-key/--target-key choose datasets of --data; without --data the harvested "
                              "file's keys are used (drop them or pass --data FILE.h5)")
        if self.data is not None and (self.model or self.corpus or self.layer is not None):
            raise ConfigError("--model/--corpus/--layer choose what to harvest; with --data nothing is harvested "
                              "(drop them or drop --data)")
        if self.data is not None:  # a missing file first: no flag would fix a wrong path
            from dictlearn.data.h5 import check_activation_file  # here: `compare --help` loads no h5py or torch

            check_activation_file(self.data)
        if self.data is not None and not self.input_key:
            raise ConfigError(f"--data {self.data}: name its input dataset with --input-key K")
        if self.data is not None and self.target_key is None:
            needing = [a for a in self.architectures if parse_architecture(a)[1] != "sae"]
            if needing:
                raise ConfigError(f"--architectures {needing[0]} is a transcoder: give --target-key K2 (the dataset "
                                  "it predicts) or drop it from --architectures")
        if not isinstance(self.include, list) or not all(isinstance(p, str) and p.strip() for p in self.include):
            raise ConfigError(f"include: {self.include!r}: give a list of paths, e.g. include: [runs/mine/export]")
        known = mechanisms()
        unknown = sorted(set(self.dictionary) - set(known))
        if unknown:
            raise ConfigError(f"dictionary: {unknown[0]!r} is not a mechanism; use one of {', '.join(known)}")
        unknown = sorted(set(self.optimizer) - set(OPTIMIZER))
        if unknown:
            raise ConfigError(f"optimizer: unknown key {unknown[0]!r}; known: {', '.join(OPTIMIZER)}")
        self._check_lr_search()

    def _check_workers(self) -> None:
        workers = self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
            raise ConfigError(f"--workers {workers}: must be a positive whole number (1: one process)")
        if workers > 1 and self.devices > 1:
            raise ConfigError(f"--workers {workers} with --devices {self.devices}: DDP already runs one process per "
                              "device; drop --workers or --devices")

    def _check_lr_search(self) -> None:
        if self.lr_grid is not None and not self.tune_lr:
            raise ConfigError("--lr-grid: the LRs of the --tune-lr search; add --tune-lr or drop --lr-grid")
        if not self.tune_lr:
            return
        grid = self.lr_grid
        if not isinstance(grid, list) or not grid:
            raise ConfigError(f"--lr-grid {_join(grid)}: give at least one learning rate, e.g. --lr-grid "
                              "3e-4,1e-3,3e-3")
        for lr in grid:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
                raise ConfigError(f"--lr-grid {_join(grid)}: {lr} is not a positive learning rate; e.g. --lr-grid "
                                  "3e-4,1e-3,3e-3")
        if len(set(grid)) != len(grid):
            raise ConfigError(f"--lr-grid {_join(grid)}: a learning rate is given twice; give each once")
        if self.devices != 1:
            raise ConfigError(f"--tune-lr runs its search in one process; drop --devices {self.devices} or --tune-lr")

    @property
    def steps(self) -> int:
        """Optimiser steps: `train_tokens` in all, `batch_size` per step on each of `devices` ranks."""
        return self.train_tokens // (self.batch_size * self.devices)


def default_workers(kind: str, n_seeds: int, replace: str | None, devices: int) -> int:
    """Worker processes when `workers` is not given: on a CPU one per seed, at most two per core
    (measured on 2 cores: three processes train as fast together as two, docs/compare.md), with
    --replace too (a seed's sweep per worker); on a GPU or under DDP, one."""
    cores = os.cpu_count() or 1
    if kind != "cpu" or devices > 1 or cores < 2:
        return 1
    return max(1, min(n_seeds, 2 * cores))


def mechanisms() -> dict:
    """The registry's {name: mechanism class} (dictlearn/dictionaries/registry.py)."""
    # imported here, not at the top: `dictlearn compare --help` reads this module and would pay
    # for torch, which the mechanism classes import
    from dictlearn.dictionaries.registry import mechanisms as registered

    return registered()


def mechanism_class(name: str):
    """The class registered as `name` (a ConfigError listing the known names otherwise)."""
    from dictlearn.dictionaries.registry import mechanism_class as registered  # as in `mechanisms`

    return registered(name)


def _number(value):
    """`value` as a float where it is a string that reads as one, else as it is."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _join(values) -> str:
    return ",".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


def parse_architecture(name: str) -> tuple[str, str]:
    """`topk_skip_transcoder` -> ("topk", "skip_transcoder"); an unknown name is a ConfigError."""
    known = mechanisms()
    for suffix in ("_skip_transcoder", "_transcoder", ""):
        mechanism = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        if (not suffix or name.endswith(suffix)) and mechanism in known:
            return mechanism, MAPPINGS[suffix]
    names = ", ".join(list(known) + ["<mechanism>_transcoder", "<mechanism>_skip_transcoder"])
    raise ConfigError(f"--architectures {name}: unknown architecture; use one of {names}")


@dataclass(frozen=True)
class Planned:
    """One dictionary of the comparison."""

    name: str
    architecture: str
    mechanism: str
    mapping: str
    l0_target: int
    d_sae: int
    seed: int
    init_args: dict
    training: dict = field(default_factory=dict)  # TrainingConfig fields: OPTIMIZER, SHORT_RUN, `optimizer:`

    @property
    def calibrated(self) -> bool:
        """True when a coefficient, calibrated to `l0_target`, sets L0 (False: `k` does)."""
        return mechanism_class(self.mechanism).mechanism.calibrated

    def build(self, d_in: int, d_out: int):
        """The untrained dictionary (seeded by DictionaryTraining from `seed`)."""
        return mechanism_class(self.mechanism)(d_in=d_in, d_out=d_out, **self.init_args)


def plan(config: CompareConfig, lrs: dict[str, float] | None = None) -> list[Planned]:
    """Every dictionary of the comparison, in a fixed order: seed, architecture, d_sae, L0 target.
    `lrs`: {architecture: learning rate} chosen by `--tune-lr` (compare/tune.py), else the common LR."""
    several_widths = len(config.d_sae) > 1
    planned = []
    for seed in config.seeds:
        for architecture in config.architectures:
            mechanism, mapping = parse_architecture(architecture)
            for d_sae in config.d_sae:
                for target in config.l0:
                    args = _init_args(config, mechanism, mapping, d_sae, target)
                    training = _training(config, mechanism)
                    if lrs and architecture in lrs:
                        training = with_lr(training, lrs[architecture])
                    width = f"_d{d_sae}" if several_widths else ""
                    name = f"{architecture}{width}_l0-{target}_s{seed}"
                    planned.append(Planned(name, architecture, mechanism, mapping, target, d_sae, seed, args, training))
    return planned


def with_lr(training: dict, lr: float) -> dict:
    """A dictionary's training settings with another learning rate (the one place it is set)."""
    return {**training, "lr": lr}


def _init_args(config: CompareConfig, mechanism: str, mapping: str, d_sae: int, target: int) -> dict:
    """One dictionary's constructor arguments: the mechanism's short-run defaults, the YAML's
    `dictionary:` overrides, the mapping, and `k` = the L0 target."""
    declared = mechanism_class(mechanism).mechanism
    overrides = {k: v for k, v in config.dictionary.get(mechanism, {}).items() if k not in _training_fields()}
    args = {"d_sae": d_sae, **declared.short_run, **overrides}
    if mapping != "sae":
        args |= {"transcoder": True, "b_dec_init": "mean", "skip_connection": mapping == "skip_transcoder"}
    if not declared.calibrated:
        args["k"] = target
    for argument, fraction in declared.short_run_steps.items():
        args.setdefault(argument, max(1, int(fraction * config.steps)))
    return args


def _training(config: CompareConfig, mechanism: str) -> dict:
    """One dictionary's training settings (`TrainingConfig` fields): the common optimiser, the
    YAML's `optimizer:`, the short run's, and training settings under the YAML's `dictionary:`."""
    overrides = {k: v for k, v in config.dictionary.get(mechanism, {}).items() if k in _training_fields()}
    return {**OPTIMIZER, **config.optimizer, **SHORT_RUN, **overrides}


def _training_fields() -> frozenset[str]:
    from dictlearn.dictionaries.model import MOVED_TO_TRAINING  # torch: not at `dictlearn compare --help`

    return MOVED_TO_TRAINING
