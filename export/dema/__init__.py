"""DeMA (Dense Mixture of Adapters): config / layer / model split after Hugging Face PEFT's tuners."""

from export.dema.config import DEFAULT_SCOPES, FAMILIES, SCOPES, DemaConfig, family_of, slot_blocks
from export.dema.layer import DemaAdapter
from export.dema.model import AdapterClassifier, TensorSpec, TrainingObjective, training_loss

__all__ = [
    "DEFAULT_SCOPES",
    "FAMILIES",
    "SCOPES",
    "AdapterClassifier",
    "DemaAdapter",
    "DemaConfig",
    "TensorSpec",
    "TrainingObjective",
    "family_of",
    "slot_blocks",
    "training_loss",
]
