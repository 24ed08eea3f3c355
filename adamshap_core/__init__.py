"""adamshap: Adam-aware In-Run Data Shapley, computed in the training pass."""

from .precond import METHODS
from .tracker import InRunShapley, StepResult, training_step

__all__ = ["METHODS", "InRunShapley", "StepResult", "training_step"]
__version__ = "0.1.0"
