"""Training: the LightningModule that trains one dictionary or a sweep of many on the same batches,
and how each is trained (`TrainingConfig`: optimiser, schedules, dead-latent window, data-dependent
start, resampling)."""

from dictlearn.training.config import TrainingConfig
from dictlearn.training.module import DictionaryTraining, Member

__all__ = ["DictionaryTraining", "Member", "TrainingConfig"]
