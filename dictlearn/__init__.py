"""dictlearn: train, evaluate and compare sparse dictionaries on neural-network activations."""

from dictlearn.data import ActivationDataModule
from dictlearn.dictionaries import BatchTopKSAE, Dictionary, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.export import load

__all__ = ["ActivationDataModule", "BatchTopKSAE", "Dictionary", "GatedSAE", "JumpReLUSAE", "ReLUL1SAE", "TopKSAE", "load"]
