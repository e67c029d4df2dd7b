"""Readers for dictionaries trained elsewhere: SAELens, sparsify, dictionary_learning and
circuit-tracer folders.

    outside = read("path/to/folder")                 # the format detected from the files
    outside = read("run", format="sparsify", hookpoint="layers.3")
    outside.dictionary.encode(x)                     # the library's own latents, on raw activations

Each reader builds a `Dictionary` (the classes of `variants.py`: dictlearn's mechanisms with the
peer's latent units) whose encode/decode/forward equal the original library's inference forward,
and collects the metadata the folder records (model, hook). `dictlearn.load` calls `read` for any
folder that is not a dictlearn export. docs/outside.md has the formats × architectures table.
"""

from __future__ import annotations

from pathlib import Path

from dictlearn.dictionaries.readers import circuit_tracer, dictionary_learning, saelens, sparsify
from dictlearn.dictionaries.readers.common import FORMATS, Outside
from dictlearn.errors import DataError

__all__ = ["FORMATS", "Outside", "detect", "read"]


def detect(folder: str | Path) -> str:
    """The format of `folder`: dictlearn (an export: SAELens layout with metadata.dictlearn),
    saelens, sparsify, dictionary_learning or circuit_tracer; a one-line DataError naming what was looked for."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if saelens.is_saelens(folder):
        metadata = saelens.read_json(folder / saelens.CFG_NAME).get("metadata")
        return "dictlearn" if isinstance(metadata, dict) and "dictlearn" in metadata else "saelens"
    if dictionary_learning.is_dictionary_learning(folder):
        return "dictionary_learning"
    if sparsify.is_sparsify(folder):
        return "sparsify"
    if circuit_tracer.is_circuit_tracer(folder):
        return "circuit_tracer"
    raise DataError(f"{folder}: not a dictionary folder: no cfg.json + sae_weights.safetensors (dictlearn, "
                    "SAELens), cfg.json + sae.safetensors (sparsify, or sub-folders of them), ae.pt "
                    "(dictionary_learning) or config.yaml + layer_0.safetensors / W_enc_0.safetensors (circuit-tracer)")


def read(folder: str | Path, format: str | None = None, hookpoint: str | None = None) -> Outside:
    """The dictionary in another library's folder (`format` None: detected). `hookpoint` picks one
    coder of a sparsify run folder, or one layer (layer_<i>) of a circuit-tracer transcoder set.
    A dictlearn export is not read here (`dictlearn.load` is)."""
    folder = Path(folder)
    format = format or detect(folder)
    if format not in FORMATS[1:]:
        raise DataError(f"format={format!r}: the readers read {', '.join(FORMATS[1:])} folders"
                        + ("; load a dictlearn export with dictlearn.load" if format == "dictlearn" else ""))
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if hookpoint is not None and format not in ("sparsify", "circuit_tracer"):
        raise DataError(f"hookpoint={hookpoint!r}: only sparsify run folders and circuit-tracer sets hold several hookpoints; "
                        f"{folder} is read as {format}")
    if format == "saelens":
        return saelens.read(folder)
    if format == "sparsify":
        return sparsify.read(folder, hookpoint)
    if format == "circuit_tracer":
        return circuit_tracer.read(folder, hookpoint)
    return dictionary_learning.read(folder)
