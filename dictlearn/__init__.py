"""dictlearn: train, evaluate and compare sparse dictionaries on neural-network activations.

The public names load on first use (PEP 562), so `dictlearn --help` and `import dictlearn.cli`
do not pay for torch, Lightning and h5py. The architectures (`dictlearn.TopKSAE`, ...) are the
shipped mechanisms of the registry (`dictlearn.dictionaries.SHIPPED`), listed nowhere else.
"""

from __future__ import annotations

import importlib

from dictlearn.lazy import lazy_attributes

_PUBLIC = {
    "ActivationDataModule": "dictlearn.data",
    "Dictionary": "dictlearn.dictionaries",
    "DictionaryTraining": "dictlearn.training",
    "Member": "dictlearn.training",
    "TrainingConfig": "dictlearn.training",
    "load": "dictlearn.export",
}


def _architectures() -> dict[str, type]:
    """{class name: class} of the shipped mechanisms and cross-layer transcoders (imports torch:
    only when one is asked for)."""
    dictionaries = importlib.import_module("dictlearn.dictionaries")
    return {**dictionaries.SHIPPED, **dictionaries.CROSS_LAYER}


# `__all__` too is answered on first use: it holds the architectures' names
__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC, _architectures)
