"""dictlearn: train, evaluate and compare sparse dictionaries on neural-network activations.

The public names load on first use (PEP 562), so `dictlearn --help` and `import dictlearn.cli`
do not pay for torch, Lightning and h5py.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "ActivationDataModule": "dictlearn.data",
    "BatchTopKSAE": "dictlearn.dictionaries",
    "Dictionary": "dictlearn.dictionaries",
    "DictionaryTraining": "dictlearn.training",
    "GatedSAE": "dictlearn.dictionaries",
    "JumpReLUSAE": "dictlearn.dictionaries",
    "Member": "dictlearn.training",
    "ReLUL1SAE": "dictlearn.dictionaries",
    "TopKSAE": "dictlearn.dictionaries",
    "load": "dictlearn.export",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dictlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
