"""`dictlearn fit|validate|test`: a LightningCLI over the data module and one dictionary or a sweep.

`model:` (one `Dictionary`, what every recipe sets) or `sweep: {name: member}` (several, see
recipes/sweep.yaml), and `training:` (`TrainingConfig`: optimiser, schedules, dead-latent window,
data-dependent start; a sweep member's own `training:` overrides it); `DictionaryTraining` trains
them. Every run starts from the
packaged `recipes/base.yaml`. Before Lightning starts, the command line is checked
(`fit_checks`) so that bad input gets one line, and a dictionary too large for memory is refused
before it is allocated.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dictlearn.callbacks import ExportOnFitEnd, RunGuard, RunProgress, _log_dir, user_error
from dictlearn.cli.fit_checks import check_command_line, check_training_memory, resolve_configs
from dictlearn.cli.recipes import BASE_RECIPE
from dictlearn.data import ActivationDataModule
from dictlearn.dictionaries import Dictionary
from dictlearn.errors import ConfigError, DictLearnError
from dictlearn.runtime import quiet_lightning
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.fit import Stopped, run_callbacks, train

LIGHTNING_COMMANDS = ("fit", "validate", "test")
FIT_DESCRIPTION = (
    "Train one dictionary (--config RECIPE) or a sweep of several (--config SWEEP.yaml). The size flags are "
    "the same for every recipe: --model.d_sae N, --model.k K (TopK, BatchTopK), --data.batch_size B "
    "(tokens per step), --seed_everything S; `--model.help TopKSAE` lists a mechanism's own flags."
)


class OneLineArgumentParser(LightningArgumentParser):
    """A parser whose usage errors are one-line ConfigErrors, not usage + a config dump."""

    def error(self, message: str, ex: Exception | None = None):
        readable = _readable_type_error(str(message))
        if readable is None:
            lines = [line.strip() for line in str(message).splitlines() if line.strip()]
            useful = [line for line in lines if not line.startswith(("Given value", "- Expected", "Subclass types"))]
            readable = " ".join(useful[:2]) or message
        raise ConfigError(f"{readable}; see dictlearn {self._subcommand_hint()} --help")

    def _subcommand_hint(self) -> str:
        return self.prog.split()[-1] if self.prog and self.prog.split()[-1] in LIGHTNING_COMMANDS else "fit"


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _readable_type_error(message: str) -> str | None:
    """jsonargparse's 'Parser key "K": ... Expected a <class 'int'> ... Given value: V' (with a
    Union's alternatives, or a nested class's own key) -> '--K V: expected a whole number'."""
    found = _type_error_parts(message)
    if found is None:
        return None
    key, value, expected = found
    return f"--{key} {value}: expected {' or '.join(expected)}" if expected else None


def _type_error_parts(message: str) -> tuple[str, str, list[str]] | None:
    message = re.sub(r"; see dictlearn \w+ --help", "", message)  # a nested parser's error, already ours
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    head = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if head is None:
        return None
    rest = [head.group(2), *lines[1:]]
    # An argument of the class given (--model.d_sae): the nested parser's error, raw or already
    # made readable by this function ('--d_sae abc: expected a whole number').
    for line in rest:
        readable = re.fullmatch(r"- --(\S+) (.*): expected (.*)", line)
        inner = readable.groups()[:2] + ([readable.group(3)],) if readable else None
        if line.startswith('- Parser key "'):
            inner = _type_error_parts(line[2:])
        if inner is not None:
            return f"{head.group(1)}.{inner[0]}", inner[1], inner[2]
    value, expected, choices = "", [], []
    for line in rest:
        got = re.search(r"(?:Got|Given) value: (.*)$", line)
        value = got.group(1) if got and not value else value
        wanted = re.match(r"(?:- )?Expected a (<class '[\w.]+'>|typing\.Literal\[.*\])", line)
        if wanted is None or "NoneType" in wanted.group(1):
            continue
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", wanted.group(1))
        if literal:
            choices += [c.strip().strip("'") for c in literal.group(1).split(",")]
        else:
            name = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", wanted.group(1)).group(1)
            expected.append(_TYPE_WORDS.get(name, name))
    if choices:
        expected.append("one of " + ", ".join(dict.fromkeys(choices)))
    return head.group(1), value, expected


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
        parser.add_class_arguments(TrainingConfig, "training", fail_untyped=False)
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

    def fit(self, model: DictionaryTraining, datamodule: ActivationDataModule, ckpt_path: str | None = None,
            **dataloaders) -> None:
        """What LightningCLI runs for `fit` (in place of `Trainer.fit`): the one training path
        `dictlearn compare` also trains through; a stop by signal raises `Stopped`."""
        train(self.trainer, model, datamodule, ckpt_path)

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
        check_training_memory(config)

    def instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except ValueError as error:
            # jsonargparse wraps a constructor's ConfigError in "Does not validate against any of
            # the Union subtypes" + a dump of the config; the user needs the one line inside.
            cause = _dictlearn_cause(error) or user_error(error)
            if cause is None:
                raise
            raise cause from None
        self.datamodule = data = self._get(self.config_init, "data")
        seed = self._get(self.config, "seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        sweep = self._get(self.config_init, "sweep")
        if sweep is not None:  # each member starts from its own seed, the run's by default
            members = {name: Member(m.dictionary, m.input_key, m.target_key, seed if m.seed is None else m.seed,
                                    m.training) for name, m in sweep.items()}
        else:
            members = Member(self._get(self.config_init, "model"), seed=seed)
        self.model = DictionaryTraining(members, self._get(self.config_init, "training"))
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
    for name, member in training.members.items():
        prefix = training.prefix(name)
        fvu, l0 = (metrics.get(f"{prefix}val/{key}") for key in ("fvu", "l0"))
        if fvu is None:
            continue
        label = "held out" if not prefix else f"{name}:"
        dead, window = _dead_over_window(training, name, tokens)
        lines.append(f"  {label} fvu {float(fvu):.4f}, l0 {float(l0):.1f}; dead {100 * dead:.1f} % of latents "
                     f"(none fired in the last {window:,} training tokens)")
    log_dir = Path(_log_dir(trainer) or trainer.default_root_dir)
    exports = log_dir / ("export" if len(training.members) == 1 else "exports")
    lines.append(f"  export: {exports}   metrics: {log_dir / 'metrics.csv'}")
    return lines


def _dead_over_window(training: DictionaryTraining, name: str, tokens_trained: int) -> tuple[float, int]:
    """-> (fraction of latents that have not fired in the window, window in tokens): the
    member's dead window, or the whole run when that is shorter.

    Not the validation's count: the held-out tail is ~1 % of the file (2,048 rows of the
    quickstart), on which a latent firing once in 3,000 tokens looks dead (26.6 % there against
    0.2 % in `dictlearn evaluate`'s 65,536-row census). The window is a third of a short run."""
    window = max(1, min(int(training.dead_windows[name]), tokens_trained))
    return float(training.activity[name].dead(window).float().mean()), window


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
    argv = resolve_configs(argv)
    check_command_line(argv)
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
            trainer_defaults={"callbacks": run_callbacks(guard, ExportOnFitEnd())},
            args=argv,
            guard=guard,
        )
    except Stopped as stop:  # fit, through `train`: the checkpoint of the last whole step is saved
        print(f"dictlearn: stopped by signal; checkpoint saved, exiting {stop.code}", file=sys.stderr)
        return stop.code
    except SIGTERMException:  # validate, test
        print(f"dictlearn: stopped by signal, exiting {guard.exit_code}", file=sys.stderr)
        return guard.exit_code
    except DictLearnError:
        raise
    except Exception as error:  # out of memory, Lightning refusing a --trainer setting: one line
        cause = user_error(error)
        if cause is None:
            raise
        raise cause from error
    finally:
        _destroy_process_group()
    return 0
