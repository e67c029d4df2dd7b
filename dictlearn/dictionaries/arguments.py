"""A dictionary's constructor arguments (`hparams`): recorded when it is built, so `dictlearn.load`
can build the same class again from a checkpoint or an export, without reading call frames."""

from __future__ import annotations

import inspect

from torch import nn

from dictlearn.errors import ConfigError

#: constructor arguments of earlier releases that are training settings now (`TrainingConfig`)
MOVED_TO_TRAINING = frozenset({
    "lr", "adam_betas", "adam_eps", "lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction",
    "dead_window_tokens", "init_sample_rows", "init_scale_from_data", "initial_l0", "sparse_path",
    "resample_every_steps", "resample_encoder_scale",
})


class Arguments(dict):
    """Constructor arguments by name, also readable as attributes (`model.hparams.k`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class RecordsArguments(nn.Module):
    """Records a module's constructor arguments as `hparams` when it is built: `__new__` sees them
    all. (In a base class of its own, not in Dictionary: jsonargparse reads a class's arguments from
    a `__new__` the class defines itself, and would then not see Dictionary's.)"""

    def __new__(cls, *args, **kwargs):
        # hparams: the arguments this dictionary was built with, so `load` can build it again
        # (what LightningCLI or the caller passed, then each class's own defaults).
        moved = sorted(MOVED_TO_TRAINING & set(kwargs))
        if moved:
            raise ConfigError(f"{cls.__name__}({moved[0]}=...): {moved[0]} is a training setting now; give it "
                              f"to the training (`training:` in a recipe, --training.{moved[0]}, TrainingConfig)")
        self = super().__new__(cls)
        object.__setattr__(self, "hparams", _constructor_arguments(cls, args, kwargs))
        return self


def model_arguments(hyper_parameters: dict) -> dict:
    """Recorded constructor arguments (a checkpoint's or an export's) without the private keys
    and the training settings earlier releases recorded there (`MOVED_TO_TRAINING`)."""
    return {k: v for k, v in hyper_parameters.items() if not str(k).startswith("_") and k not in MOVED_TO_TRAINING}


def _constructor_arguments(cls: type, args: tuple, kwargs: dict) -> Arguments:
    """The arguments of `cls(*args, **kwargs)` by name, `**kwargs` spread out, then the defaults
    of every `__init__` along the class chain for the names not given (the outermost class's
    default wins: it is the one the class passes on)."""
    arguments: dict = {}
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError:
        return Arguments()  # __init__ raises the caller's error itself
    for name, value in list(bound.arguments.items())[1:]:
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = value
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, RecordsArguments):
            for name, parameter in inspect.signature(klass.__init__).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    arguments.setdefault(name, parameter.default)
    return Arguments(arguments)
