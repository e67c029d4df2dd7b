"""Training: the LightningModule that trains one dictionary or a sweep of many on the same batches."""

from dictlearn.training.module import DictionaryTraining, Member

__all__ = ["DictionaryTraining", "Member"]
