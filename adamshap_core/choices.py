"""What a recipe and the commands choose from: the methods, the model kinds, the optimizers, each
named once. It imports nothing of the package, so that the recipe schema, the data sources and the
CLI's ``--help`` read the names without importing the models."""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

MethodName = Literal["adam", "adam_fixed", "sgd"]  # precond.METHODS holds their rules (a test: the same)
HFModelKind = Literal["hf-gpt2", "hf-llama"]  # transformers' models (models/hf.py builds them)
LanguageModelKind = Literal["gpt", HFModelKind]  # text sources, the sequence loss, attribution
ModelKind = Literal["mlp", "cnn", LanguageModelKind]
OptimizerName = Literal["adam", "adamw", "sgd"]

METHOD_NAMES = get_args(MethodName)
HF_MODEL_KINDS = get_args(HFModelKind)
LANGUAGE_MODELS = get_args(LanguageModelKind)
MODEL_KINDS = get_args(ModelKind)
OPTIMIZERS = get_args(OptimizerName)

INSTALL_HINT = "pip install 'adamshap[hf]' (or pip install transformers)"


def transformers_missing() -> bool:
    """Whether the optional transformers extra, which the hf-* model kinds need, is not installed."""
    return importlib.util.find_spec("transformers") is None
