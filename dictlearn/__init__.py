"""dictlearn: train, evaluate and compare sparse dictionaries on neural-network activations.

The public names load on first use (PEP 562), so `dictlearn --help` and `import dictlearn.cli`
do not pay for torch, Lightning and h5py.
"""

from __future__ import annotations

from dictlearn.lazy import lazy_attributes

_PUBLIC = {
    "ActivationDataModule": "dictlearn.data",
    "BatchTopKSAE": "dictlearn.dictionaries",
    "Dictionary": "dictlearn.dictionaries",
    "DictionaryTraining": "dictlearn.training",
    "GatedSAE": "dictlearn.dictionaries",
    "JumpReLUSAE": "dictlearn.dictionaries",
    "MatryoshkaBatchTopKSAE": "dictlearn.dictionaries",
    "Member": "dictlearn.training",
    "ReLUL1SAE": "dictlearn.dictionaries",
    "TopKSAE": "dictlearn.dictionaries",
    "load": "dictlearn.export",
}
__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC)
