"""The ghost engine and its per-layer kernels (importing a kernel module registers it)."""

from . import conv2d, embedding, layer_norm, linear  # noqa: F401  (registration)
from .ghost import GhostEngine
from .registry import LayerKernel, kernel_for, register, supported_types

__all__ = ["GhostEngine", "LayerKernel", "kernel_for", "register", "supported_types"]
