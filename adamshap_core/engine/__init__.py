"""The ghost engine and its per-layer kernels (importing a kernel module registers it)."""

from . import (  # noqa: F401  (registration)
    conv2d,
    embedding,
    layer_norm,
    linear,
    transformers_conv1d,
    transformers_rms_norm,
)
from .ghost import GhostEngine
from .registry import LayerKernel, kernel_for, register, supported_types

__all__ = ["GhostEngine", "LayerKernel", "kernel_for", "register", "supported_types"]
