"""`dictlearn fit|validate|test`: a LightningCLI over the data module and one dictionary or a sweep.

`model:` (one `Dictionary`, what every recipe sets) or `sweep: {name: member}` (several, see
recipes/sweep.yaml); either way `DictionaryTraining` trains them. Every run starts from the
packaged `recipes/base.yaml`. Before Lightning starts, the command line is checked so that a
misspelled flag, a missing checkpoint, an unwritable log folder or an empty run gets one line.
"""

from __future__ import annotations

import difflib
import sys
import time
import inspect
import warnings
from pathlib import Path
from typing import Optional

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dictlearn.callbacks import ExportOnFitEnd, KeepFreedMemory, RunGuard, RunProgress, _log_dir
from dictlearn.cli.parsing import check_writable_folder
from dictlearn.cli.recipes import BASE_RECIPE, resolve_config
from dictlearn.data import ActivationDataModule
from dictlearn.dictionaries import Dictionary
from dictlearn.errors import ConfigError, DictLearnError
from dictlearn.runtime import quiet_lightning
from dictlearn.training import DictionaryTraining, Member

LIGHTNING_COMMANDS = ("fit", "validate", "test")
FIT_DESCRIPTION = (
    "Train one dictionary (--config RECIPE) or a sweep of several (--config SWEEP.yaml). The size flags are "
    "the same for every recipe: --model.d_sae N, --model.k K (TopK, BatchTopK), --data.batch_size B "
    "(tokens per step), --seed_everything S; `--model.help TopKSAE` lists a mechanism's own flags."
)


class OneLineArgumentParser(LightningArgumentParser):
    """A parser whose usage errors are one-line ConfigErrors, not usage + a config dump."""

    def error(self, message: str, ex: Exception | None = None):
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(("Given value", "- Expected", "Subclass types"))]
        raise ConfigError(f"{' '.join(useful[:2]) or message}; see dictlearn {self._subcommand_hint()} --help")

    def _subcommand_hint(self) -> str:
        return self.prog.split()[-1] if self.prog and self.prog.split()[-1] in LIGHTNING_COMMANDS else "fit"


class DictLearnCLI(LightningCLI):
    """LightningCLI over `model:` (one Dictionary) or `sweep:` (several), with the data widths
    linked into each dictionary and checked against the file."""

    def __init__(self, *args, guard: RunGuard | None = None, **kwargs) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_subclass_arguments(Dictionary, "model", fail_untyped=False, required=False)
        parser.add_argument(
            "--sweep", type=Optional[dict[str, Member]], default=None,
            help="several dictionaries trained on the same batches: {name: {dictionary: {class_path, init_args}, "
                 "input_key, target_key, seed}} (recipes/sweep.yaml); instead of --model",
        )  # fmt: skip
        parser.add_lightning_class_args(self._datamodule_class, "data")

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.d_in", "model.init_args.d_in", apply_on="instantiate")
        parser.link_arguments("data.d_out", "model.init_args.d_out", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("enable_progress_bar") is not False and self.subcommand == "fit":
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], RunProgress()]
        if config.get("logger") in (None, True):  # offline CSV logs under default_root_dir
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or ".", name="lightning_logs")
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        """Validate the final model (unless the last validation already ran at the last step)
        and print a summary."""
        trainer, training, data = self.trainer, self.model, self.datamodule
        seconds = time.perf_counter() - self._fit_start
        if data.n_val > 0 and training.validated_at_step != trainer.global_step:
            trainer.validate(training, datamodule=data, verbose=False)
        if trainer.is_global_zero:
            print("\n".join(_summary(trainer, training, seconds, data.batch_size)), file=sys.stderr)

    def parse_arguments(self, parser, args) -> None:
        # main() always passes argv (minus --debug), so Lightning's warning about getting both
        # `args` and sys.argv fired on every command-line run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.guard is not None:  # so a run failing on bad input can remove the folders it made
            self.guard.note_root(Path(config.trainer.get("default_root_dir") or "."))
        if (config.get("model") is None) == (config.get("sweep") is None):
            raise ConfigError(
                "give either --model (one dictionary: --config recipes/topk.yaml) or a sweep "
                "(--config my_sweep.yaml with a `sweep:` section), not both or neither"
            )
        if config.get("sweep") is not None:
            _link_sweep_widths(config)
            self._requested_widths = {}
            return
        init_args = config.model.init_args if "init_args" in config.model else config.model
        self._requested_widths = {k: init_args.get(k) for k in ("d_in", "d_out")}

    def instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ValueError as error:
            # jsonargparse wraps a constructor's ConfigError in "Does not validate against any of
            # the Union subtypes" + a dump of the config; the user needs the one line inside.
            cause = _dictlearn_cause(error)
            if cause is None:
                raise
            raise cause from None
        self.datamodule = data = self._get(self.config_init, "data")
        seed = self._get(self.config, "seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        sweep = self._get(self.config_init, "sweep")
        if sweep is not None:  # each member starts from its own seed, the run's by default
            members = {name: Member(m.dictionary, m.input_key, m.target_key, seed if m.seed is None else m.seed)
                       for name, m in sweep.items()}
        else:
            members = Member(self._get(self.config_init, "model"), seed=seed)
        self.model = DictionaryTraining(members)
        self.trainer = self.instantiate_trainer()
        for name, requested in self._requested_widths.items():
            actual = getattr(data, name)
            if requested not in (None, 0) and requested != actual:
                raise ConfigError(
                    f"--model.{name} {requested} disagrees with {data.hparams.path}: "
                    f"'{data.hparams.target_key if name == 'd_out' and data.hparams.target_key else data.hparams.input_key}' "
                    f"has width {actual}; drop --model.{name} (it is read from the file)"
                )


def _summary(trainer, training: DictionaryTraining, seconds: float, batch_size: int) -> list[str]:
    """The lines a finished fit ends with: what was trained, the held-out metrics, where things are."""
    tokens = trainer.global_step * batch_size * trainer.world_size
    lines = [f"dictlearn: trained {trainer.global_step:,} steps ({tokens:,} tokens) in {seconds:,.0f} s "
             f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)"]
    metrics = trainer.callback_metrics
    for name in training.members:
        prefix = training.prefix(name)
        values = {key: metrics.get(f"{prefix}val/{key}") for key in ("fvu", "l0", "dead_fraction")}
        if values["fvu"] is None:
            continue
        label = "held out" if not prefix else f"{name}:"
        lines.append(f"  {label} fvu {float(values['fvu']):.4f}, l0 {float(values['l0']):.1f}, "
                     f"dead {100 * float(values['dead_fraction']):.1f} % of latents")
    log_dir = Path(_log_dir(trainer) or trainer.default_root_dir)
    exports = log_dir / ("export" if len(training.members) == 1 else "exports")
    lines.append(f"  export: {exports}   metrics: {log_dir / 'metrics.csv'}")
    return lines


def _link_sweep_widths(config) -> None:
    """Each sweep member's d_in/d_out from its keys in --data.path (what `link_arguments` does
    for --model); a width given that disagrees with the file is an error."""
    from dictlearn.data.h5 import H5Array

    data = config.data.init_args if "init_args" in config.data else config.data
    for name, member in config.sweep.items():
        args = member.dictionary.init_args
        transcoder = bool(args.get("transcoder"))
        input_key = member.get("input_key") or data.input_key
        target_key = member.get("target_key") or (data.target_key if transcoder else None)
        if transcoder and target_key is None:
            raise ConfigError(f"sweep member {name!r} is a transcoder: give it a target_key (or --data.target_key)")
        d_in = H5Array(data.path, input_key).d
        d_out = d_in if target_key is None else H5Array(data.path, target_key).d
        for size, width in (("d_in", d_in), ("d_out", d_out)):
            if args.get(size) not in (None, 0, width):
                raise ConfigError(
                    f"sweep member {name!r}: {size} {args.get(size)} disagrees with {data.path}: its data has "
                    f"width {width}; drop {size} (it is read from the file)"
                )
            args[size] = width


def _dictlearn_cause(error: BaseException) -> DictLearnError | None:
    """The first DictLearnError in `error`'s chain of causes, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DictLearnError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _destroy_process_group() -> None:
    """Avoids an abort at interpreter exit after DDP (a gloo group left open aborts in its destructor)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """`argv` = [subcommand, flags...] -> exit code."""
    argv = _resolve_configs(argv)
    _check_command_line(argv)
    quiet_lightning()
    guard = RunGuard()
    parser_kwargs = {cmd: {"default_config_files": [str(BASE_RECIPE)]} for cmd in LIGHTNING_COMMANDS}
    parser_kwargs["fit"]["description"] = FIT_DESCRIPTION
    try:
        DictLearnCLI(
            None,
            ActivationDataModule,
            auto_configure_optimizers=False,
            parser_class=OneLineArgumentParser,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            trainer_defaults={"callbacks": [guard, ExportOnFitEnd(), KeepFreedMemory()]},
            args=argv,
            guard=guard,
        )
    except SIGTERMException:
        print(f"dictlearn: stopped by signal; checkpoint saved, exiting {guard.exit_code}", file=sys.stderr)
        return guard.exit_code
    finally:
        _destroy_process_group()
    return 0


# ------------------------------------------------------------------- checks before Lightning starts
def _resolve_configs(argv: list[str]) -> list[str]:
    """Every `--config X` names a file: recipes by name or documented path resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def _flag_values(argv: list[str]) -> list[tuple[str, str | None]]:
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


def _check_command_line(argv: list[str]) -> None:
    flags = _flag_values(argv[1:])
    if any(flag in ("--help", "-h", "--print_config") or flag.endswith(".help") for flag, _ in flags):
        return
    values = dict(flags)
    configs = _configs(argv)
    _check_flag_names(configs, flags)
    ckpt = values.get("--ckpt_path")
    if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).is_file():
        raise ConfigError(f"--ckpt_path {ckpt}: no such checkpoint file; give the path of a .ckpt (e.g. <run>/checkpoints/last.ckpt)")
    if argv[0] == "fit":
        steps = _config_value(configs, "trainer", "max_steps", values.get("--trainer.max_steps"))
        epochs = _config_value(configs, "trainer", "max_epochs", values.get("--trainer.max_epochs"))
        if steps is not None and int(steps) == 0:
            raise ConfigError("--trainer.max_steps 0 trains nothing (the export would hold the random start); give N > 0")
        if steps is not None and int(steps) < 0 and epochs in (None, -1, "-1"):
            raise ConfigError("--trainer.max_steps -1 with --trainer.max_epochs -1 would never stop; give one of them")
        root = _config_value(configs, "trainer", "default_root_dir", values.get("--trainer.default_root_dir"))
        check_writable_folder(root or ".", "--trainer.default_root_dir")


def _configs(argv: list[str]) -> list[dict]:
    """The base recipe and every `--config` file of argv, parsed, in order; an unreadable file is
    skipped (the parser reports it itself)."""
    paths = [BASE_RECIPE, *(Path(value) for flag, value in _flag_values(argv) if flag == "--config" and value)]
    configs = []
    for path in paths:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        configs.append(loaded if isinstance(loaded, dict) else {})
    return configs


def _config_value(configs: list[dict], section: str, key: str, flag_value: str | None):
    """`section.key` as the command line sets it: the flag, else the last config file that has it."""
    if flag_value is not None:
        return flag_value
    value = None
    for loaded in configs:
        if isinstance(loaded.get(section), dict) and key in loaded[section]:
            value = loaded[section][key]
    return value


def _check_flag_names(configs: list[dict], flags: list[tuple[str, str | None]]) -> None:
    """`--model.NAME`, `--data.NAME`, `--trainer.NAME` must name a constructor argument."""
    from lightning.pytorch import Trainer

    model = _model_class(configs, flags)
    known = {
        "--data.": _parameters(ActivationDataModule),
        "--trainer.": _parameters(Trainer),
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


def _model_class(configs: list[dict], flags) -> type | None:
    """The dictionary class the command line picks: `--model X`, else the configs' `model.class_path`."""
    import importlib

    import dictlearn

    path = None
    for loaded in configs:
        if isinstance(loaded.get("model"), dict) and loaded["model"].get("class_path"):
            path = loaded["model"]["class_path"]
    for flag, value in flags:
        if flag == "--model" and value and not value.endswith((".yaml", ".yml", "}")):
            path = value
    if path is None:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module) if module else dictlearn, name)
    except (ImportError, AttributeError):
        return None  # the parser says which class it cannot find


def _parameters(cls: type) -> set[str]:
    """Constructor arguments of `cls` and, through **kwargs, of its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    return names
