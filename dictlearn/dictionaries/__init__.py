"""Sparse dictionaries: one LightningModule base, one small class per sparsity mechanism."""

from dictlearn.dictionaries.model import Dictionary
from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.gated import GatedSAE
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.matryoshka import MatryoshkaBatchTopKSAE
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE

__all__ = ["BatchTopKSAE", "Dictionary", "GatedSAE", "JumpReLUSAE", "MatryoshkaBatchTopKSAE", "ReLUL1SAE", "TopKSAE"]
