"""Training: settings (settings.py), the trainer every method shares (trainer.py), one file per method (methods/),
the loss pieces and the class prior."""
from ..errors import TrainingCancelled
from ..models.precision import autocast_dtype, weights_dtype
from ..text.templates import DEFAULT_TEMPLATES
from .methods.object_driven import LORA_TARGETS, ObjectDriven, ObjectDrivenSettings
from .fields import MethodSettings
from .settings import StepReport, TrainSettings
from .trainer import OneShotTrainer, TrainResult, train_concept

__all__ = ["DEFAULT_TEMPLATES", "LORA_TARGETS", "MethodSettings", "ObjectDriven", "ObjectDrivenSettings", "OneShotTrainer",
           "StepReport", "TrainResult", "TrainSettings", "TrainingCancelled", "autocast_dtype", "train_concept", "weights_dtype"]
