"""adamshap: Adam-aware In-Run Data Shapley, computed in the training pass.

The public names are imported on first use (PEP 562), so that importing the package, as the CLI's
``--help`` does, does not import torch.
"""

from importlib import import_module

__all__ = ["METHODS", "FastMode", "InRunShapley", "StepResult", "UserError", "training_step"]
__version__ = "0.1.0"

_HOME = {
    "METHODS": ".precond",
    "FastMode": ".fast",
    "InRunShapley": ".tracker",
    "StepResult": ".tracker",
    "UserError": ".errors",
    "training_step": ".tracker",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOME[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
