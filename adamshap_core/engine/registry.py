"""One ghost kernel per layer type, registered with a decorator (as Opacus does).

A kernel knows three things about its layer type: which of the module's own
parameters it values, what to keep from the forward pass, and how to turn the
kept activations ``a``, the output-gradients ``b`` and the per-parameter
matrices ``M`` into ⟨M, g_i⟩ for every example i, without building g_i; and, for the
few validation rows that share the training batch, how to build their gradients.

A new layer type is a ``LayerKernel`` subclass decorated with ``@register(TheModule)``, in a file of its
own (``linear.py`` is the model to follow); a kernel shipped with the package is also listed in
``engine/__init__.py``, whose import registers it. Its test is a case in ``tests/cases.py``, which the
exactness tests check against brute force.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from .low_rank import LowRank


class LayerKernel:
    """Base class of a layer kernel; subclasses are registered per module type.

    Its ``values`` and ``gradients`` (and their stacked forms) run without autograd (in
    ``torch.inference_mode()``, a check of the fused rows in ``torch.no_grad()``, a compiled
    valuation in a graph): they compute from their tensors directly."""

    #: the module's own parameters this kernel values (e.g. ``("weight", "bias")``)
    param_names: tuple[str, ...] = ()

    def check(self, module: nn.Module, path: str) -> None:
        """Raise ``UserError`` at start-up for a configuration the kernel cannot value."""

    def low_rank_params(self, module: nn.Module) -> tuple[str, ...]:
        """Parameters whose M may be given as ``LowRank`` factors (fast mode)."""
        return ()

    def keep(self, module: nn.Module, inputs: tuple) -> torch.Tensor:
        """What the forward pass must keep for ``values`` (by default the input)."""
        return inputs[0].detach()

    def keep_output_gradient(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        """What the backward pass must keep as ``b``: the output's gradient, with the batch first as
        ``keep`` gives ``a`` (rows of ``b`` are cut as rows of ``a``)."""
        return grad

    def intermediate_floats(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor, K: int) -> int:
        """An upper bound on the floats ``values`` holds at once per example, for K matrices: the
        engine contracts a chunk of examples at a time where the batch would exceed its budget.
        By default two tensors (a product and the operand it is formed from) of K times the larger
        of an example's input and output-gradient."""
        return 2 * K * max(a.numel(), b.numel()) // a.shape[0] if len(a) else 0

    def values(
        self, module: nn.Module, a: torch.Tensor, b: torch.Tensor, M: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """⟨M_k, g_i⟩ summed over the module's parameters: shape [B, K].

        ``a`` and ``b`` come already in the contraction dtype (``matrix_dtype(M)``)
        when floating. ``b`` is the gradient of the training loss with respect to the module
        output; ``M[name]`` has shape [K, *param.shape] (or is a ``LowRank``
        stack for the names ``low_rank_params`` gives) and holds only the
        parameters that are being valued.
        """
        raise NotImplementedError

    def gradients(
        self, module: nn.Module, a: torch.Tensor, b: torch.Tensor, names: Collection[str], summed: bool
    ) -> dict[str, torch.Tensor]:
        """Per-row gradients {name: [R, *param.shape]} of the parameters ``names``, from the
        ``a`` and ``b`` of R rows; with ``summed``, their sum over the rows ([1, *shape], one
        product instead of R). Required: a tracker compares them with autograd's gradients at
        start-up (``coverage.py``), and builds the validation rows' gradients from them where the
        rows ride in the training batch."""
        raise NotImplementedError

    # ---- optional: values straight from the validation rows' a and b ----------------------------------
    # Where ∇val of a parameter is its validation rows' gradient times a scalar (P = 1: the ``sgd``
    # method, or an SGD optimizer), ⟨∇val, g_i⟩ needs neither gradient: the classic ghost dot-product.

    def rows_params(self, module: nn.Module) -> tuple[str, ...]:
        """Parameters ``rows_values`` can value (by default none)."""
        return ()

    def rows_values(
        self,
        module: nn.Module,
        a: torch.Tensor,
        b: torch.Tensor,
        a_rows: torch.Tensor,
        b_rows: torch.Tensor,
        K: int,
    ) -> torch.Tensor | None:
        """⟨G_r, g_i⟩ [B, R] for the ``rows_params``, G_r the gradient of validation row r from its
        ``a_rows``/``b_rows`` and g_i that of example i from ``a``/``b``; None where contracting K
        matrices M would cost less."""
        return None

    # ---- optional: calls of equal shapes valued together ------------------------------------------
    # On a small model a kernel call is mostly the dispatch of a few tiny products; the calls of one
    # key (the same projection in every block, say) are then stacked on a new leading dimension G and
    # valued in one call of batched products.

    def group_key(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> Hashable | None:
        """Calls of this kernel whose keys are equal (not None) may go to ``values_stacked`` and
        ``gradients_stacked`` together. None (the default): every call alone. The key may read the
        module and a's and b's shapes and dtypes, not their values: the engine keeps the stacks it
        formed for the next step's calls of the same modules, shapes and keys."""
        return None

    def values_stacked(
        self, modules: Sequence[nn.Module], a: torch.Tensor, b: torch.Tensor, M: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``values`` summed over G calls of one ``group_key``: a [G, B, ...], b [G, B, ...] and
        M {name: [G, K, *shape]} (exact matrices, never low-rank) → [B, K]."""
        raise NotImplementedError

    def gradients_stacked(
        self,
        modules: Sequence[nn.Module],
        a: torch.Tensor,
        b: torch.Tensor,
        names: Collection[str],
        summed: bool,
    ) -> list[dict[str, torch.Tensor]]:
        """``gradients`` of G calls of one ``group_key``, a and b stacked [G, R, ...]: one dict per call."""
        raise NotImplementedError


def split_stacked(grads: Mapping[str, torch.Tensor], G: int) -> list[dict[str, torch.Tensor]]:
    """{name: [G·R, *shape]}, the rows of G stacked calls one after another → per call {name: [R, *shape]}."""
    parts = {name: g.view(G, -1, *g.shape[1:]).unbind(0) for name, g in grads.items()}
    return [{name: p[i] for name, p in parts.items()} for i in range(G)]


_KERNELS: dict[type[nn.Module], LayerKernel] = {}
# kernels of layer types from optional packages, by the type's import path
# ("transformers.pytorch_utils.Conv1D"), so that a model without such a layer never imports the package
_KERNELS_BY_PATH: dict[str, LayerKernel] = {}


def register(*module_types: type[nn.Module] | str):
    """Class decorator: ``@register(nn.Linear)`` makes the kernel serve that type; a string names a type
    by its import path (``"package.module.Class"``), for a layer of a package that need not be installed."""

    def wrap(cls: type[LayerKernel]) -> type[LayerKernel]:
        required = ("values", "gradients")
        lacking = [name for name in required if getattr(cls, name) is getattr(LayerKernel, name)]
        if lacking:
            raise TypeError(
                f"layer kernel {cls.__name__} does not define {' or '.join(lacking)}: a kernel values "
                "from a and b (values) and builds per-row gradients from them (gradients), which a "
                "tracker checks against autograd at start-up"
            )
        for t in module_types:
            if isinstance(t, str):
                if "." not in t:
                    raise ValueError(f"{t!r} is not an import path: expected 'package.module.Class'")
                _KERNELS_BY_PATH[t] = cls()
            else:
                _KERNELS[t] = cls()
        return cls

    return wrap


def kernel_for(module: nn.Module) -> LayerKernel | None:
    """The kernel for this module's type (or its nearest registered base class)."""
    for t in type(module).__mro__:
        kernel = _KERNELS.get(t) or _KERNELS_BY_PATH.get(f"{t.__module__}.{t.__qualname__}")
        if kernel is not None:
            return kernel
    return None


def matrix_dtype(M: Mapping[str, torch.Tensor | LowRank]) -> torch.dtype:
    """The dtype the contractions run in: M's (float32 or wider, even under autocast)."""
    m = next(iter(M.values()))
    return m.U.dtype if isinstance(m, LowRank) else m.dtype


def n_targets(M: Mapping[str, torch.Tensor | LowRank]) -> int:
    """K, the number of stacked matrices (methods × validation targets)."""
    m = next(iter(M.values()))
    return m.U.shape[0] if isinstance(m, LowRank) else m.shape[0]


def supported_types() -> list[str]:
    by_path = [f"{path.rsplit('.', 1)[1]} ({path.split('.', 1)[0]})" for path in _KERNELS_BY_PATH]
    return sorted(t.__name__ for t in _KERNELS) + sorted(by_path)


def unsupported(path: str, module: nn.Module, why: str) -> UserError:
    name = path or "<root>"
    return UserError(f"module '{name}' ({type(module).__name__}) cannot be valued: {why}")
