"""adamshap: Adam-aware In-Run Data Shapley, computed in the training pass."""

from .precond import METHODS
from .tracker import FastMode, InRunShapley, StepResult, training_step

__all__ = ["METHODS", "FastMode", "InRunShapley", "StepResult", "training_step"]
__version__ = "0.1.0"
