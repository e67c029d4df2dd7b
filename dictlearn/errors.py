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


def note(message: str) -> None:
    """Print `dictlearn: note: <message>` on stderr, on a line of its own.

    On a terminal a progress line (tqdm's, or compare's) may be drawn without its newline; the
    note first clears it, so the note is not glued to the end of that line, and the progress
    line is redrawn below at its next update."""
    import sys

    stream = sys.stderr
    clear = "\r\033[K" if hasattr(stream, "isatty") and stream.isatty() else ""
    stream.write(f"{clear}dictlearn: note: {message}\n")
    stream.flush()
