"""Activation data: HDF5 reading/writing, the training DataModule and synthetic ground truth."""

from dictlearn.data.datamodule import ActivationDataModule
from dictlearn.data.h5 import H5Array, open_for_write, write_datasets
from dictlearn.data.synth import SynthData, feature_probabilities, synthesize, write_synth_file

__all__ = [
    "ActivationDataModule",
    "H5Array",
    "SynthData",
    "feature_probabilities",
    "open_for_write",
    "synthesize",
    "write_datasets",
    "write_synth_file",
]
