"""Checks of a `dictlearn fit|validate|test` command line before Lightning starts: a misspelled
flag, an unknown dictionary class, a config file that is not YAML, a step count that is not a
whole number, a missing or unreadable checkpoint, a validation with nothing to validate, an
unwritable log folder and an empty run each get one line (exit 2) and leave nothing behind.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import zipfile
from pathlib import Path

import yaml

from dictlearn.io import check_writable_folder
from dictlearn.cli.recipes import BASE_RECIPE, resolve_config
from dictlearn.errors import ConfigError

HELP_FLAGS = ("--help", "-h", "--print_config")
# --ckpt_path values Lightning resolves itself (from a fit in the same process); fit only
_NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


def resolve_configs(argv: list[str]) -> list[str]:
    """Every `--config X` names a file: recipes by name or documented path resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def flag_values(argv: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value or None) for every `--flag value` / `--flag=value` of argv."""
    pairs = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            if "=" in arg:
                pairs.append(tuple(arg.split("=", 1)))
            else:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
                pairs.append((arg, value))
    return pairs


def wants_help(argv: list[str]) -> bool:
    return any(flag in HELP_FLAGS or flag.endswith(".help") for flag, _ in flag_values(argv[1:])) or "-h" in argv


def check_command_line(argv: list[str]) -> None:
    """argv = [subcommand, flags...]; raise a one-line ConfigError for what can be told from
    the command line and config files alone."""
    if wants_help(argv):
        return
    flags = flag_values(argv[1:])
    values = dict(flags)
    configs = _configs(argv)
    model = model_class(configs, flags)
    _check_moved_settings(argv, flags)
    _check_flag_names(model, flags)
    _check_checkpoint(argv[0], _config_value(configs, None, "ckpt_path", values.get("--ckpt_path")))
    _check_data_path(_config_value(configs, "data", "path", values.get("--data.path")))
    _check_trainer_numbers(configs, values)
    if argv[0] == "fit":
        _check_run_length(configs, values)
        root = _config_value(configs, "trainer", "default_root_dir", values.get("--trainer.default_root_dir"))
        check_writable_folder(root or ".", "--trainer.default_root_dir")


def _check_checkpoint(command: str, ckpt) -> None:
    """fit may resume from a checkpoint; validate and test measure one, so they need it."""
    if command != "fit" and not ckpt:
        raise ConfigError(
            f"dictlearn {command} needs --ckpt_path CKPT, the checkpoint to measure (e.g. "
            "<run>/checkpoints/last.ckpt); without one it would measure an untrained dictionary"
        )
    if not ckpt or (command == "fit" and ckpt in _NAMED_CHECKPOINTS):
        return
    path = Path(str(ckpt))
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such checkpoint file"
        raise ConfigError(f"--ckpt_path {ckpt}: {what}; give the path of a .ckpt (e.g. <run>/checkpoints/last.ckpt)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no directory
        raise ConfigError(f"--ckpt_path {ckpt}: not a checkpoint written by dictlearn fit (truncated, or another kind of file)")


def _check_run_length(configs: list[dict], values: dict) -> None:
    steps = _whole_number(_config_value(configs, "trainer", "max_steps", values.get("--trainer.max_steps")),
                          "--trainer.max_steps")
    epochs = _whole_number(_config_value(configs, "trainer", "max_epochs", values.get("--trainer.max_epochs")),
                           "--trainer.max_epochs")
    if steps == 0:
        raise ConfigError("--trainer.max_steps 0 trains nothing (the export would hold the random start); give N > 0")
    if steps is not None and steps < 0 and epochs in (None, -1):
        raise ConfigError(f"--trainer.max_steps {steps} with --trainer.max_epochs -1 would never stop; give one of them")


# Trainer arguments Lightning takes without checking: out of range, they divide by zero mid-run
# (accumulate_grad_batches 0, val_check_interval 0), or train or log nothing without a word.
_TRAINER_MINIMUMS = {
    "accumulate_grad_batches": (1, "a whole number >= 1"),
    "log_every_n_steps": (1, "a whole number >= 1"),
    "check_val_every_n_epoch": (1, "a whole number >= 1, or null (validate every --trainer.val_check_interval steps)"),
    "num_sanity_val_steps": (-1, "a whole number >= -1"),
    "gradient_clip_val": (0, "a number >= 0"),
    "min_steps": (0, "a whole number >= 0"),
}
_POSITIVE_FRACTIONS = {  # a count (> 0) or a fraction in (0, 1]
    "val_check_interval": "validate every N steps (e.g. 500) or a fraction of an epoch in (0, 1]",
    "limit_train_batches": "0 trains nothing; give N > 0 batches or a fraction in (0, 1]",
}


def _check_trainer_numbers(configs: list[dict], values: dict) -> None:
    for name, (minimum, wanted) in _TRAINER_MINIMUMS.items():
        number = _number(_config_value(configs, "trainer", name, values.get(f"--trainer.{name}")))
        if number is not None and number < minimum:
            raise ConfigError(f"--trainer.{name} {_shown(number)}: expected {wanted}")
    for name, wanted in _POSITIVE_FRACTIONS.items():
        number = _number(_config_value(configs, "trainer", name, values.get(f"--trainer.{name}")))
        if number is not None and (number <= 0 or (number > 1 and number != int(number))):
            raise ConfigError(f"--trainer.{name} {_shown(number)}: {wanted}")


def _number(value) -> float | None:
    """A flag's or config's number; None for null and for text the parser will refuse itself."""
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _shown(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)


def _check_data_path(path) -> None:
    if path is not None and Path(str(path)).is_dir():
        raise ConfigError(f"--data.path {path}: a folder; give an HDF5 file (dictlearn harvest --out FILE.h5 writes one)")


def _whole_number(value, flag: str) -> int | None:
    """A step or epoch count from a flag or a config file -> int; anything else is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not re.fullmatch(r"\s*[+-]?\d+\s*", str(value)):
        raise ConfigError(f"{flag} {value}: expected a whole number (e.g. {flag} 1000)")
    return int(value)


def _configs(argv: list[str]) -> list[dict]:
    """The base recipe and every `--config` file of argv, parsed, in order. A file that is not
    YAML, or whose top level is not a mapping, is an error naming the file (and the line)."""
    paths = [BASE_RECIPE, *(Path(value) for flag, value in flag_values(argv) if flag == "--config" and value)]
    configs = []
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"--config {path}: a folder; give a YAML file (e.g. --config topk)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as error:
            raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML{_yaml_where(error)}; fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected sections (model:, data:, trainer:), "
                              f"found a {type(loaded).__name__} at the top level")
        configs.append(loaded)
    return configs


def _yaml_where(error: yaml.YAMLError) -> str:
    """' at line L, column C (problem)' from a PyYAML error, as far as it tells."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None)
    return f"{where} ({problem})" if problem else where


def _config_value(configs: list[dict], section: str | None, key: str, flag_value: str | None):
    """`section.key` (top-level `key` when section is None) as the command line sets it: the
    flag, else the last config file that has it."""
    if flag_value is not None:
        return flag_value
    value = None
    for loaded in configs:
        scope = loaded if section is None else loaded.get(section)
        if isinstance(scope, dict) and key in scope:
            value = scope[key]
    return value


def _check_moved_settings(argv: list[str], flags: list[tuple[str, str | None]]) -> None:
    """The training settings that were dictionary arguments before (`--model.lr`, a recipe's
    `model.init_args.lr`, a sweep member's `dictionary.init_args.lr`) get one line naming their
    new place."""
    from dictlearn.dictionaries.model import MOVED_TO_TRAINING

    for flag, _ in flags:
        name = flag.removeprefix("--model.").removeprefix("init_args.")
        if flag.startswith("--model.") and name in MOVED_TO_TRAINING:
            raise ConfigError(f"{flag} is a training setting now: use --training.{name}")
    paths = [Path(value) for flag, value in flag_values(argv) if flag == "--config" and value]
    for path, loaded in zip(paths, _configs(argv)[1:]):
        model = loaded.get("model")
        args = model.get("init_args", model) if isinstance(model, dict) else {}
        for name in sorted(MOVED_TO_TRAINING & set(args if isinstance(args, dict) else ())):
            raise ConfigError(f"--config {path}: model.init_args.{name} is a training setting now; move it to "
                              f"a top-level `training:` section (training: {{{name}: ...}}) or pass --training.{name}")
        sweep = loaded.get("sweep")
        for member, spec in (sweep.items() if isinstance(sweep, dict) else ()):
            dictionary = spec.get("dictionary") if isinstance(spec, dict) else None
            args = dictionary.get("init_args") if isinstance(dictionary, dict) else None
            for name in sorted(MOVED_TO_TRAINING & set(args if isinstance(args, dict) else ())):
                raise ConfigError(f"--config {path}: sweep member {member!r}: dictionary.init_args.{name} is a "
                                  f"training setting now; move it to the member's `training:` ({{{name}: ...}}) "
                                  "or the run's `training:` section")


def _check_flag_names(model: type | None, flags: list[tuple[str, str | None]]) -> None:
    """`--model.NAME`, `--data.NAME`, `--trainer.NAME`, `--training.NAME` must name a constructor argument."""
    from lightning.pytorch import Trainer

    from dictlearn.data import ActivationDataModule
    from dictlearn.training.config import DEFAULTS as TRAINING_SETTINGS

    known = {
        "--data.": _parameters(ActivationDataModule),
        "--trainer.": _parameters(Trainer),
        "--training.": set(TRAINING_SETTINGS),
        **({"--model.": _parameters(model)} if model is not None else {}),
    }
    for flag, _ in flags:
        for prefix, names in known.items():
            if not flag.startswith(prefix):
                continue
            name = flag[len(prefix):].removeprefix("init_args.").split(".")[0]
            if name not in names and name not in ("help", "class_path", "init_args"):
                close = difflib.get_close_matches(name, sorted(names), n=1)
                hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(sorted(names))}"
                raise ConfigError(f"unknown flag {flag}{hint}")


def known_dictionaries() -> list[str]:
    """The dictionary classes `--model NAME` accepts by their short name."""
    import dictlearn.dictionaries

    return [name for name in dictlearn.dictionaries.__all__ if name != "Dictionary"]


def model_class(configs: list[dict], flags) -> type | None:
    """The dictionary class the command line picks: `--model X`, else the configs' `model.class_path`;
    None when it picks none (a sweep). A name that is not a dictionary class is an error that
    lists the known ones."""
    path, source = None, None
    for loaded in configs:
        if isinstance(loaded.get("model"), dict) and loaded["model"].get("class_path"):
            path, source = loaded["model"]["class_path"], "model.class_path"
    for flag, value in flags:
        if flag == "--model" and value and not value.endswith((".yaml", ".yml", "}")):
            path, source = value, "--model"
    if path is None:
        return None
    from dictlearn.dictionaries import Dictionary

    module, _, name = str(path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module or "dictlearn.dictionaries"), name, None)
    except ImportError as error:
        raise ConfigError(f"{source} {path}: cannot import {module} ({error}); "
                          f"known dictionaries: {', '.join(known_dictionaries())}") from None
    if not (isinstance(found, type) and issubclass(found, Dictionary)):
        raise ConfigError(f"{source} {path}: not a dictionary class; known: {', '.join(known_dictionaries())} "
                          "(or a recipe: --config topk)")
    return found


def _parameters(cls: type) -> set[str]:
    """Constructor arguments of `cls` and, through **kwargs, of its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    return names


# ------------------------------------------------------------------- memory, once the config is parsed
# float32 parameter + its gradient + Adam's two moments (exp_avg, exp_avg_sq)
BYTES_PER_TRAINED_PARAMETER = 16


def dictionary_shapes(config) -> list[tuple[str, dict]]:
    """(flag prefix, init_args with d_in/d_out filled from the data file) per dictionary of a
    parsed config: `--model.` for one, `sweep member 'NAME' ` for each member of a sweep."""
    from dictlearn.data.h5 import H5Array

    if config.get("sweep") is not None:  # widths already linked from the file
        return [(f"sweep member {name!r}: ", dict(m.dictionary.init_args)) for name, m in config.sweep.items()]
    data = config.data.init_args if "init_args" in config.data else config.data
    args = dict(config.model.init_args if "init_args" in config.model else config.model)
    if data.get("path") is None or not data.get("input_key"):
        return []  # the data module reports what is missing
    args["d_in"] = args.get("d_in") or H5Array(data.path, data.input_key).d
    target = data.get("target_key") if args.get("transcoder") else None
    args["d_out"] = args.get("d_out") or (H5Array(data.path, target).d if target else args["d_in"])
    return [("--model.", args)]


def training_bytes(args: dict, batch_size: int) -> tuple[int, int]:
    """-> (bytes that do not grow with d_sae, bytes per latent) that training one dictionary
    needs at least: W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out],
    W_skip [d_out, d_in], each with its gradient and Adam state, plus one float32 [batch, d_sae]
    pre-activation. Mechanisms add a few [d_sae] vectors (thresholds, gates); a lower bound."""
    d_in, d_out = int(args["d_in"]), int(args.get("d_out") or args["d_in"])
    fixed = BYTES_PER_TRAINED_PARAMETER * (d_out + (d_in * d_out if args.get("skip_connection") else 0))
    return fixed, BYTES_PER_TRAINED_PARAMETER * (d_in + d_out + 1) + 4 * batch_size


def check_training_memory(config) -> None:
    """Refuse, before anything is allocated, dictionaries whose training cannot fit in memory
    (a d_sae of 10^11 asked torch for 6.4 TB and died with a 80-line traceback)."""
    shapes = dictionary_shapes(config)
    if not shapes:
        return
    data = config.data.init_args if "init_args" in config.data else config.data
    available, where = available_memory(config.trainer)
    if available is None:
        return
    costs = [training_bytes(args, int(data.batch_size)) for _, args in shapes]
    need = sum(fixed + per_latent * int(args["d_sae"]) for (fixed, per_latent), (_, args) in zip(costs, shapes))
    if need <= available:
        return
    prefix, args = shapes[0]
    share = available // len(shapes)  # with several members, an equal share of memory each
    fits = max(0, (share - costs[0][0]) // costs[0][1])
    sizes = ", ".join(f"{int(a['d_sae']):,}" for _, a in shapes)
    raise ConfigError(
        f"{prefix}d_sae {sizes}: training needs at least {_bytes(need)} (parameters, gradients, Adam state "
        f"and a [batch, d_sae] pre-activation, d_in {int(args['d_in'])}, batch {int(data.batch_size)}) "
        f"but {_bytes(available)} {where}; {prefix}d_sae up to about {_round_down(fits):,} would fit"
    )


def available_memory(trainer) -> tuple[int | None, str]:
    """(bytes, where) the run's dictionaries will live in: the first GPU's memory when the run
    uses CUDA, else the RAM available now (MemAvailable, capped by a cgroup limit)."""
    accelerator = str(trainer.get("accelerator") or "auto")
    strategy = str(trainer.get("strategy") or "auto")
    if accelerator in ("gpu", "cuda", "auto") and "fork" not in strategy and "notebook" not in strategy:
        import torch

        if torch.cuda.is_available():  # total, not free: reading free memory would open a context
            return torch.cuda.get_device_properties(0).total_memory, "is the memory of cuda:0"
    return _available_ram(), "of RAM is available"


def _available_ram() -> int | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None
    try:  # a container's cgroup v2 limit, when it is lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:,.1f} {unit}"


def _round_down(n: int) -> int:
    """Down to two significant digits: 41,873,112 -> 41,000,000."""
    if n < 100:
        return int(n)
    scale = 10 ** (len(str(int(n))) - 2)
    return int(n) // scale * scale
