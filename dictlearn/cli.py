"""The `dictlearn` command.

`dictlearn fit|validate|test` is a LightningCLI over `Dictionary` subclasses and the
`ActivationDataModule`; every run starts from `recipes/base.yaml` and a recipe adds its model.
The other subcommands (`synth`, `export`, `harvest`, `evaluate`) are plain argparse. A `DictLearnError` prints as one line
(`--debug` shows the traceback) and exits 2; a run stopped by SIGTERM/SIGINT exits 128 + signal.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dictlearn.callbacks import ExportOnFitEnd, KeepFreedMemory, RunGuard
from dictlearn.data import ActivationDataModule
from dictlearn.dictionaries import Dictionary
from dictlearn.errors import ConfigError, DictLearnError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
BASE_RECIPE = RECIPES_DIR / "base.yaml"


class DictLearnCLI(LightningCLI):
    """LightningCLI with the data widths linked into the model and d_in checked against the file."""

    def __init__(self, *args, guard: RunGuard | None = None, **kwargs) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.d_in", "model.init_args.d_in", apply_on="instantiate")
        parser.link_arguments("data.d_out", "model.init_args.d_out", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # offline CSV logs under default_root_dir
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or ".", name="lightning_logs")
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # main() always passes argv (minus --debug), so Lightning's warning about getting both
        # `args` and sys.argv fired on every command-line run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        init_args = config.model.init_args if "init_args" in config.model else config.model
        self._requested_widths = {k: init_args.get(k) for k in ("d_in", "d_out")}
        if self.guard is not None:  # so a run failing on bad input can remove the folders it made
            self.guard.note_root(Path(config.trainer.get("default_root_dir") or "."))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse wraps a constructor's ConfigError in "Does not validate against any of
            # the Union subtypes" + a dump of the config; the user needs the one line inside.
            cause = _dictlearn_cause(error)
            if cause is None:
                raise
            raise cause from None
        data = self.datamodule
        for name, requested in self._requested_widths.items():
            actual = getattr(data, name)
            if requested not in (None, 0) and requested != actual:
                raise ConfigError(
                    f"--model.{name} {requested} disagrees with {data.hparams.path}: "
                    f"'{data.hparams.target_key if name == 'd_out' and data.hparams.target_key else data.hparams.input_key}' "
                    f"has width {actual}; drop --model.{name} (it is read from the file)"
                )


def _dictlearn_cause(error: BaseException) -> DictLearnError | None:
    """The first DictLearnError in `error`'s chain of causes, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DictLearnError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _check_configs(argv: list[str]) -> None:
    """An unknown recipe gets one line listing the recipes there are."""
    for i, arg in enumerate(argv):
        path = None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and not Path(path).is_file():
            known = ", ".join(sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if p.name != "base.yaml"))
            raise ConfigError(f"--config {path}: no such recipe file; recipes in {RECIPES_DIR}: {known}")


def run_lightning(argv: list[str]) -> int:
    _check_configs(argv)
    guard = RunGuard()
    parser_kwargs = {cmd: {"default_config_files": [str(BASE_RECIPE)]} for cmd in LIGHTNING_COMMANDS}
    try:
        DictLearnCLI(
            Dictionary,
            ActivationDataModule,
            subclass_mode_model=True,
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


def _destroy_process_group() -> None:
    """Avoids an abort at interpreter exit after DDP (ECOSYSTEM §2)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv else "--help"
    try:
        if command in LIGHTNING_COMMANDS:
            code = run_lightning(argv)
        elif command in SUBCOMMANDS:
            code = SUBCOMMANDS[command](argv[1:])
        else:
            print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
            code = 0 if command in ("-h", "--help") else 2
    except DictLearnError as error:
        if debug:
            traceback.print_exc()
        print(f"dictlearn: error: {error}", file=sys.stderr)
        code = 2
    return code


# ------------------------------------------------------------------- argparse subcommands
def cmd_synth(argv: list[str]) -> int:
    from dictlearn.data.synth import write_synth_file

    p = argparse.ArgumentParser(prog="dictlearn synth", description="Activations from known sparse features -> HDF5.")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--rows", type=int, default=200_000, help="tokens (rows) to write")
    p.add_argument("--d", type=int, default=64, help="activation width")
    p.add_argument("--features", type=int, default=256, help="number of true features")
    p.add_argument("--mean-active", type=float, default=4.0, help="mean active features per row")
    p.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of feature frequencies (0: uniform)")
    p.add_argument("--magnitude", default="exponential", choices=["exponential", "uniform", "lognormal"])
    p.add_argument("--magnitude-mean", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std per dimension")
    p.add_argument("--correlation", type=float, default=0.0, help="co-firing probability of paired features")
    p.add_argument("--hierarchy", type=int, default=0, help="number of parent features with children")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-out", type=int, default=0,
                   help="transcoder mode: also write 'target' [rows, d_out] from the same codes through a second dictionary")
    p.add_argument("--dense-linear", type=float, default=0.0,
                   help="transcoder mode: add this times a random linear map of the input to the target")
    args = p.parse_args(argv)
    write_synth_file(
        args.out, n_rows=args.rows, d=args.d, n_features=args.features, mean_active=args.mean_active,
        zipf_exponent=args.zipf, magnitude=args.magnitude, magnitude_mean=args.magnitude_mean,
        noise_std=args.noise, correlation=args.correlation, hierarchy=args.hierarchy, seed=args.seed,
        d_out=args.d_out, dense_linear=args.dense_linear,
    )
    target = f", target 'target' [{args.d_out}] (true output features at 'features_out')" if args.d_out else ""
    print(f"dictlearn: wrote {args.rows} rows x {args.d} (key 'acts', true features at 'features'{target}) to {args.out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    from dictlearn.export import export, load

    p = argparse.ArgumentParser(prog="dictlearn export", description="Checkpoint -> export folder (SAELens layout).")
    p.add_argument("checkpoint", help="a dictlearn Lightning checkpoint (.ckpt)")
    p.add_argument("out", help="export folder to write (replaced atomically if it exists)")
    args = p.parse_args(argv)
    import torch

    model = load(args.checkpoint)
    attrs = torch.load(args.checkpoint, map_location="cpu", weights_only=False).get("dictlearn_data", {})
    export(model, args.out, attrs)
    print(f"dictlearn: export written to {args.out}")
    return 0


def cmd_harvest(argv: list[str]) -> int:
    from dictlearn.data.harvest import main as harvest_main

    return harvest_main(argv)


def cmd_evaluate(argv: list[str]) -> int:
    from dictlearn.evaluate import main as evaluate_main

    return evaluate_main(argv)


SUBCOMMANDS = {"synth": cmd_synth, "export": cmd_export, "harvest": cmd_harvest, "evaluate": cmd_evaluate}

USAGE = """usage: dictlearn COMMAND [options]   (add --debug to any command for tracebacks)

  fit       train a dictionary:   dictlearn fit --config recipes/topk.yaml --data.path F.h5 --data.input_key acts
  validate  metrics on the held-out rows of a file for a checkpoint (--ckpt_path)
  test      same as validate, logged under test/
  synth     write synthetic activations with known features: dictlearn synth --out synth.h5
  export    checkpoint -> SAELens-layout export folder: dictlearn export CKPT OUT
  harvest   language-model activations -> HDF5: dictlearn harvest --out acts.h5 (embedded model, stdlib corpus)
  evaluate  export(s) + HDF5 (+ model) -> one JSON line per export: dictlearn evaluate EXPORT --data acts.h5

`dictlearn fit --help` lists every option; recipes live in recipes/."""


if __name__ == "__main__":
    sys.exit(main())
