"""What every reader shares: the loaded result, the checks with one-line errors, building the
dictionary from raw-unit tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.readers.variants import OUTSIDE_CLASSES
from dictlearn.errors import DataError

FORMATS = ("dictlearn", "saelens", "sparsify", "dictionary_learning", "circuit_tracer")


@dataclass
class Outside:
    """A dictionary read from another library's folder, and what the folder records about it.

    metadata: the keys dictlearn's own exports keep under cfg.json's `metadata`, where the folder
    records them (`model_name`, `hook_name`, `hook_name_out`, `context_size`), and what else the
    reader keeps: `source_architecture` (the library's name for it: SAELens' architecture,
    dictionary_learning's class, sparsify's topk_sae / topk_transcoder / topk_skip_transcoder),
    `sparsify_hookpoint`, `dictionary_learning_submodule`, `dictionary_learning_layer`."""

    dictionary: Dictionary
    format: str
    source: Path
    metadata: dict = field(default_factory=dict)


def read_json(path: Path, advice: str = "copy the folder again") -> dict:
    """A JSON object from `path`; a one-line DataError naming the file (and ending in `advice`)
    otherwise."""
    if not path.is_file():
        raise DataError(f"{path}: missing; the folder is not complete")
    try:
        value = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; {advice}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                        f"{advice}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: holds a JSON {type(value).__name__}, not an object; {advice}")
    return value


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: missing; the folder is not complete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: cannot read the weights ({error}); the file is truncated or not safetensors") from None


def field_of(cfg: dict, name: str, where: Path, kind: type | tuple[type, ...] = int, default=...):
    """cfg[name] of type `kind`; a one-line DataError naming the file and the field otherwise."""
    if name not in cfg or cfg[name] is None:
        if default is not ...:
            return default
        raise DataError(f"{where}: no field {name!r}; the file is not a complete config")
    value = cfg[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataError(f"{where}: field {name!r} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def tensor(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], where: Path, why: str = "") -> Tensor:
    """tensors[name] as float32, checked to have `shape`; one line naming the file and the field."""
    if name not in tensors:
        raise DataError(f"{where}: no tensor {name!r}{why}; it holds {', '.join(sorted(tensors)) or 'nothing'}")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
        raise DataError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}{why}")
    return value.detach().float().clone()


def build(mechanism: str, tensors: dict[str, Tensor], where: Path, **arguments) -> Dictionary:
    """The `OUTSIDE_CLASSES[mechanism]` dictionary with `arguments`, holding `tensors` (raw units,
    names of dictlearn's export: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, ...)."""
    cls = OUTSIDE_CLASSES[mechanism]
    try:
        model = cls(**arguments)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    except ValueError as error:  # a ConfigError: a recorded field outside what the class accepts
        raise DataError(f"{where}: {error}".replace("--model.", "field ")) from None
    try:
        model.load_folded(tensors)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        bad = next(name for name, t in tensors.items() if not torch.isfinite(t).all())
        raise DataError(f"{where}: tensor {bad!r} holds NaN or Inf values")
    return model.requires_grad_(False).eval()
