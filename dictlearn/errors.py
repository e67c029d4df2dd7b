"""Errors a person can act on.

`DictLearnError` carries one line that names the file, field or flag at fault and what would fix
it. The CLI prints it without a traceback (``--debug`` shows the traceback).
"""


class DictLearnError(Exception):
    """A user-facing error: one line, naming what is wrong and how to fix it."""


class DataError(DictLearnError, ValueError):
    """An activation file, key or batch that cannot be trained on."""


class ConfigError(DictLearnError, ValueError):
    """A constructor argument or CLI flag outside its valid range."""


class NonFiniteError(DictLearnError, FloatingPointError):
    """NaN or Inf met in a batch, a loss or a gradient; training stops before the bad step."""


class InputError(DictLearnError, ValueError):
    """A tensor handed to a dictionary's encode/decode/forward of the wrong shape, dtype or device."""
