"""Sparse dictionaries: one plain `Dictionary` base, one small class per sparsity mechanism, and
the one registry of mechanisms (`registry.mechanisms()`: name -> class).

Importing a mechanism's module here is what ships it: the registry lists every imported
`Dictionary` subclass that declares a `mechanism`, and `SHIPPED` and `__all__` are read from it.
"""

from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.crosslayer import CrossLayerJumpReLU, CrossLayerTopK
from dictlearn.dictionaries.gated import GatedSAE
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.matryoshka import MatryoshkaBatchTopKSAE
from dictlearn.dictionaries.registry import mechanisms
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE

#: the shipped mechanism classes by class name (`--model TopKSAE`, `dictlearn.TopKSAE`)
SHIPPED = {cls.__name__: cls for cls in mechanisms().values() if cls.__module__.startswith(f"{__name__}.")}

#: cross-layer transcoders: a mapping over shipped mechanisms (they register no mechanism of their own)
CROSS_LAYER = {cls.__name__: cls for cls in (CrossLayerJumpReLU, CrossLayerTopK)}

__all__ = ["Dictionary", *sorted([*SHIPPED, *CROSS_LAYER])]
