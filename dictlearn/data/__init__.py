"""Activation data: HDF5 reading/writing, the training DataModule and synthetic ground truth.

The public names load on first use (PEP 562), so `dictlearn.data.h5` and `dictlearn.evaluate` do
not pay for Lightning, which only the DataModule needs.
"""

from __future__ import annotations

from dictlearn.lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC)
