"""Activation data: HDF5 reading/writing, the training DataModule and synthetic ground truth.

The public names load on first use (PEP 562), so `dictlearn.data.h5` and `dictlearn.evaluate` do
not pay for Lightning, which only the DataModule needs.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "ActivationDataModule": "dictlearn.data.datamodule",
    "H5Array": "dictlearn.data.h5",
    "SynthData": "dictlearn.data.synth",
    "feature_probabilities": "dictlearn.data.synth",
    "open_for_write": "dictlearn.data.h5",
    "synthesize": "dictlearn.data.synth",
    "write_datasets": "dictlearn.data.h5",
    "write_synth_file": "dictlearn.data.synth",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dictlearn.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
