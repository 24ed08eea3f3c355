"""The ghost engine: hooks that keep each layer's input and output-gradient, and
the contraction of those with the per-parameter matrices M (README: How it works).

Per step: ``validation_gradients`` (a separate pass that never touches
``.grad``), then the training forward/backward inside ``capture()``, then
``values`` with M = scale ⊙ ∇val stacked over methods and validation targets.
Or the validation rows ride along in the training batch (``capture(extra_rows=V)``):
``extra_gradients`` then builds their gradients from the same a and b, and
``contract`` reads only the training rows.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..batches import n_rows, pick_rows, row_tensors
from ..errors import UserError
from ..workspace import Workspace
from .buffers import buffers_kept
from .low_rank import LowRank, factorize, factorizing_pays
from .registry import (
    LayerKernel,
    kernel_for,
    matrix_dtype,
    n_targets,
    supported_types,
    unsupported,
)
from .subnormals import subnormals_flushed

if TYPE_CHECKING:
    from ..precond import Scale  # the scoring rule's output, which the kernels take

# the default of ``GhostEngine.contract_chunk``
CONTRACT_CHUNK = 1 << 26
# the default of ``GhostEngine.stack_floats``: calls are stacked where that saves dispatching small
# products; a stack's copies of a, b and M and its intermediates stay within this many floats (1 MiB in
# float32, about what stays in a core's cache: beyond it, stacking slows the products more than it saves)
STACK_FLOATS = 1 << 18
# stack plans kept (``GhostEngine._stacks``): one per batch shape and kind of call list
STACK_PLANS = 16


@dataclass
class Call:
    """One forward call of a valued module inside ``capture()``."""

    module: nn.Module
    kernel: LayerKernel
    a: torch.Tensor
    b: torch.Tensor | None = None


@dataclass(frozen=True)
class RowsTarget:
    """∇val is the gradient of this capture's extra rows (the validation rows in the training batch)
    times ``scale``: summed over the rows (one target), or one target per row. Where a parameter's M is
    that times a scalar per method, ``contract`` may take ⟨M, g_i⟩ from the rows' a and b directly."""

    scale: float
    summed: bool


Owned = dict[nn.Module, tuple[LayerKernel, dict[str, nn.Parameter]]]  # module -> its kernel, its parameters


def _valued_modules(model: nn.Module) -> tuple[Owned, dict[nn.Module, str], list[nn.Parameter]]:
    """Each module owning trainable parameters: its kernel and those parameters by name, and its path;
    and every such parameter once, in model order (a tied one is valued through all its uses). A
    module without a kernel, or with a parameter its kernel does not value, is refused."""
    owned: Owned = {}
    paths: dict[nn.Module, str] = {}
    parameters: list[nn.Parameter] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        kernel = kernel_for(module)
        if kernel is None:
            raise unsupported(
                path,
                module,
                f"it owns trainable parameters ({', '.join(own)}) and no kernel exists for this "
                f"layer type; supported: {', '.join(supported_types())}",
            )
        extra = sorted(set(own) - set(kernel.param_names))
        if extra:
            raise unsupported(path, module, f"unexpected trainable parameters {extra}")
        kernel.check(module, path)
        owned[module], paths[module] = (kernel, own), path
        for p in own.values():
            if id(p) not in seen:
                seen.add(id(p))
                parameters.append(p)
    return owned, paths, parameters


def _in_order(parameters: list[nn.Parameter], order: Sequence[torch.Tensor]) -> list[nn.Parameter]:
    """Those of ``parameters`` that ``order`` holds (the optimizer's, say), in its order."""
    position = {id(p): i for i, p in enumerate(order)}
    return sorted((p for p in parameters if id(p) in position), key=lambda p: position[id(p)])


class GhostEngine:
    """Values per-example gradient dot-products for every trainable parameter of a model."""

    def __init__(self, model: nn.Module, order: Sequence[torch.Tensor] | None = None, val_chunk: int = 64):
        """``order``: the parameters to value, in the order of the flat layout (for example
        the optimizer's); by default every trainable parameter, in model order."""
        self.model = model
        self.val_chunk = val_chunk  # validation targets per vmap call
        self._row_by_row = False  # whether per-target gradients need a pass per row (vmap failed)
        # floats a kernel's intermediate tensors may hold at once in the contraction (256 MiB in float32)
        self.contract_chunk = CONTRACT_CHUNK
        # floats a stack of calls contracted together may copy and hold (0: every call alone)
        self.stack_floats = STACK_FLOATS
        # id(param) -> rows this step contracts, to those every process contracts (DDP; data_parallel.py):
        # whether factorising a weight pays is then decided alike everywhere
        self.total_rows: Callable[[dict[int, int]], dict[int, int]] | None = None
        # each valued module's kernel and {param name: parameter} it values, and its path (for messages)
        self._owned, self._paths, found = _valued_modules(model)
        self.parameters: list[nn.Parameter] = found if order is None else _in_order(found, order)
        if not self.parameters:
            raise UserError(
                "the model has no trainable parameters to value"
                if order is None or not found
                else "none of the model's trainable parameters is in the optimizer: "
                "expected an optimizer built over model.parameters()"
            )
        # the flat layout: every per-parameter quantity (∇val, P, M) lives in one [rows, N] tensor
        self._slices: dict[int, slice] = {}
        offset = 0
        for p in self.parameters:
            self._slices[id(p)] = slice(offset, offset + p.numel())
            offset += p.numel()
        self.numel = offset
        self._by_id = {id(p): p for _, own in self._owned.values() for p in own.values()}
        self._calls: list[Call] = []
        self._capturing = False
        self._extra_rows = 0  # rows after the training batch in this capture (validation rows)
        self._generator = torch.Generator(device=self.parameters[0].device).manual_seed(0)
        self._modules = list(model.modules())
        self._workspace = Workspace()  # the flat M buffer, reused every step
        self._copied_buffers: set[int] | None = None  # those the validation pass copies (buffers.py)
        self._handles = [m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self._owned]
        self._twinned = _twinned(self._owned)  # the modules whose calls may be stacked with another's
        # the stacks of the last few steps' calls, by what decides them (``_stacks``): a step repeats
        # the calls of the step before, and working its stacks out again costs microseconds per call
        self._stack_plans: dict[tuple, list[list[int]]] = {}
        # weight matrices the last step with a rank contracted through low-rank factors (fast mode: only
        # those whose factored contraction costs less than the exact one)
        self.last_factored = 0

    @property
    def factorable(self) -> int:
        """How many valued weight matrices a kernel may contract through low-rank factors."""
        return len(
            {
                id(own[name])
                for module, (kernel, own) in self._owned.items()
                for name in kernel.low_rank_params(module)
                if name in own and id(own[name]) in self._slices
            }
        )

    # ---- hooks ---------------------------------------------------------------------------

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self._capturing or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        kernel = self._owned[module][0]
        call = Call(module, kernel, kernel.keep(module, _positional(module, args, kwargs)))
        self._calls.append(call)

        def keep_grad(grad: torch.Tensor) -> None:
            call.b = kernel.keep_output_gradient(module, grad.detach())

        # a hook, though it costs a Python call from the backward pass: asking torch.autograd.grad for
        # the output's gradient edge with the parameters' gradients was a little faster (1.4% of a small
        # GPT's valued step), but skips the accumulation into .grad whose hooks plain training runs
        # (DistributedDataParallel's gradient averaging)
        output.register_hook(keep_grad)

    @contextmanager
    def capture(self, extra_rows: int = 0):
        """Keep a and b of every valued module call made inside the block.

        ``extra_rows``: rows appended after the training batch (validation rows), which
        ``contract`` leaves out and ``extra_gradients`` reads.
        """
        self._calls = []
        self._capturing = True
        self._extra_rows = extra_rows
        try:
            yield
        finally:
            self._capturing = False
            self._calls = []
            self._extra_rows = 0

    def generator_state(self) -> torch.Tensor:
        """The state of the engine's own random stream (low-rank factorisations)."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- validation gradient ----------------------------------------------------------------

    def validation_gradients(
        self, loss_fn: Callable, inputs, targets, per_target: bool
    ) -> tuple[torch.Tensor, float]:
        """∇ of the validation loss at the current weights, flat: [Q, N] in the layout.

        Q = 1 (the mean over the validation rows) unless ``per_target``, where
        every row is its own target. Computed in eval mode (no dropout noise, no
        random numbers drawn), without touching ``.grad``, and leaving the buffers
        as they were (``buffers.py``).
        """
        with modes_kept(self._modules), buffers_kept(self.model, self._copied_buffers) as buffers:
            set_modes(self._modules, training=False)
            if per_target:
                out = self._per_target_gradients(loss_fn, inputs, targets)
            else:
                loss = loss_fn(self.model(inputs), targets).mean()
                out = self.flatten_by_id(self._gradients_by_id(loss), rows=1).detach(), float(loss.detach())
            # the first pass copied every buffer; later ones copy only those it (or a later one) changed
            self._copied_buffers = (self._copied_buffers or set()) | {id(b) for _, _, b in buffers.changed()}
        return out

    def _gradients_by_id(self, loss: torch.Tensor) -> dict[int, torch.Tensor | None]:
        """id(param) → ∇ of ``loss``, for the layout's parameters that still require gradients. One
        frozen after the engine was built has none (``flatten_by_id`` gives it zeros), as in plain
        training, where the optimizer then skips it."""
        live = [p for p in self.parameters if p.requires_grad]
        if not live or not loss.requires_grad:
            return {}
        grads = torch.autograd.grad(loss, live, allow_unused=True)
        return {id(p): g for p, g in zip(live, grads, strict=True)}

    def _per_target_gradients(self, loss_fn, inputs, targets):
        rows = n_rows(targets)
        if rows is None:
            raise UserError("per_target needs validation targets that hold a tensor with one row per target")
        device = next(row_tensors(targets)).device
        if not self._row_by_row:
            try:
                return self._vmapped_gradients(loss_fn, inputs, targets, rows, device)
            except RuntimeError as e:
                if "vmap" not in str(e) and "transform" not in str(e):
                    raise
                # a model vmap cannot batch (Python branching on a tensor's value, .item()) or torch.func
                # cannot differentiate (a forward that updates a buffer in place): one row at a time
                # computes the same, more slowly; a real error of the model shows there again
                self._row_by_row = True
        return self._looped_gradients(loss_fn, inputs, targets, rows, device)

    def _vmapped_gradients(self, loss_fn, inputs, targets, rows: int, device) -> tuple[torch.Tensor, float]:
        """Each validation row's gradient, ``val_chunk`` rows per vmap call."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = {names[id(p)]: p.detach() for p in self.parameters}
        buffers = dict(self.model.named_buffers())

        def one_loss(ps, row):  # row: one row's index, a batch of one (inputs may be a dict or tuple)
            out = functional_call(self.model, (ps, buffers), (pick_rows(inputs, row[None]),))
            return loss_fn(out, pick_rows(targets, row[None])).mean()

        per_row = vmap(grad_and_value(one_loss), in_dims=(None, 0))
        chunks, losses = [], []
        for start in range(0, rows, self.val_chunk):
            g, loss = per_row(params, torch.arange(start, min(start + self.val_chunk, rows), device=device))
            losses.append(loss)
            chunks.append(self.flatten([g[names[id(p)]] for p in self.parameters], rows=len(loss)))
        return torch.cat(chunks), float(torch.cat(losses).mean())

    def _looped_gradients(self, loss_fn, inputs, targets, rows: int, device) -> tuple[torch.Tensor, float]:
        """Each validation row's gradient, one backward pass per row."""
        grads, losses = [], []
        for r in range(rows):
            row = torch.tensor([r], device=device)
            loss = loss_fn(self.model(pick_rows(inputs, row)), pick_rows(targets, row)).mean()
            grads.append(self.flatten_by_id(self._gradients_by_id(loss), rows=1).detach())
            losses.append(loss.detach())
        return torch.cat(grads), float(torch.stack(losses).mean())

    def extra_gradients(
        self, batch_size: int, summed: bool, calls: list[Call] | None = None, rows: slice | None = None
    ) -> dict[int, torch.Tensor]:
        """id(param) → the gradient of the extra rows' loss, [rows, *shape] per row (or
        [1, *shape] ``summed`` over them), from the a and b captured with ``extra_rows``; a tied
        parameter's calls are summed. Every owned parameter the rows reached is included, also
        one outside the layout, since its ``.grad`` holds their part as well. ``calls``: those of
        ``captured(batch_size)``, passed in by compiled code (which cannot read them itself), or
        kept from an earlier backward pass; ``rows``: which of the extra rows, from 0 (None: all)."""
        out: dict[int, torch.Tensor] = {}
        parts = []
        # one slice of the captured rows (a slice costs as much as a small product)
        lo, hi = (batch_size, None) if rows is None else (batch_size + rows.start, batch_size + rows.stop)
        for call in self.captured(batch_size) if calls is None else calls:
            assert call.b is not None  # captured() keeps the calls that got an output-gradient
            dtype = torch.promote_types(call.b.dtype, torch.float32)  # as ∇val is used: float32 or wider
            a, b = _cast(call.a[lo:hi], dtype), _cast(call.b[lo:hi], dtype)
            parts.append(Part(call, a, b, self._owned[call.module][1]))
        for stack in self._stacks(parts, intermediate=False):
            kernel, first = stack[0].call.kernel, stack[0]
            if len(stack) == 1:
                grads = [kernel.gradients(first.call.module, first.a, first.b, first.params, summed)]
            else:
                a, b = _stack(stack)
                grads = kernel.gradients_stacked([p.call.module for p in stack], a, b, first.params, summed)
            for part, by_name in zip(stack, grads, strict=True):
                for name, g in by_name.items():
                    key = id(part.params[name])
                    out[key] = g if key not in out else out[key] + g
        return out

    @property
    def owned_parameters(self) -> list[nn.Parameter]:
        """Every parameter a valued module owns (the layout's and any outside the optimizer), once."""
        return list(self._by_id.values())

    def held_gradients(self) -> dict[int, torch.Tensor]:
        """id(param) → its ``.grad``, for every owned parameter that has one."""
        return {key: p.grad for key, p in self._by_id.items() if p.grad is not None}

    def flatten(self, tensors: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
        """Per-parameter tensors [rows, *shape] (or [*shape] for rows = 1), in layout order → [rows, N]."""
        return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)

    def flatten_by_id(self, grads: Mapping[int, torch.Tensor | None], rows: int) -> torch.Tensor:
        """id(param) → [rows, *shape] (or [*shape] for rows = 1) → the layout's [rows, N], with zeros
        for a parameter that has none (the loss does not reach it)."""
        some = next((g for g in grads.values() if g is not None), None)
        parts = []
        for p in self.parameters:
            g = grads.get(id(p))
            if g is None:
                dtype = p.dtype if some is None else some.dtype
                g = torch.zeros(rows, *p.shape, dtype=dtype, device=p.device)
            parts.append(g)
        return self.flatten(parts, rows)

    def slice_of(self, p: torch.Tensor) -> slice:
        """Where parameter ``p`` sits in the flat layout."""
        return self._slices[id(p)]

    # ---- values ---------------------------------------------------------------------------------

    def values(
        self,
        val_grads: torch.Tensor,
        scales: Iterable[tuple[slice, Sequence[Scale]]],
        n_methods: int,
        batch_size: int,
        rank: int | None = None,
        calls: list[Call] | None = None,
        rows: RowsTarget | None = None,
        priced: int | None = None,
    ) -> torch.Tensor:
        """φ[i, m, q] = Σ_W ⟨scale_m,W ⊙ ∇val_q,W, g_i,W⟩ / B, from the captured a and b.

        ``val_grads`` is the flat [Q, N] validation gradient; ``scales`` lists, per segment of
        the layout, each of the ``n_methods`` methods' multiplier of ∇val there (lr, clip
        factor and preconditioner P together); parameters outside every segment are not valued
        (the optimizer does not move them). ``b`` is the gradient of the *mean* loss, which
        supplies the 1/B. ``rank``, ``priced``: see ``matrices``; ``calls``: see ``extra_gradients``;
        ``rows``: where ∇val comes from (see ``contract``).
        """
        M = self.matrices(val_grads, scales, n_methods, rank, priced)
        with subnormals_flushed(val_grads.device):  # sums of products only: see subnormals.py
            values = self.contract(M, batch_size, calls, rows)
        return values.view(batch_size, n_methods, val_grads.shape[0])

    def matrices(
        self,
        val_grads: torch.Tensor,
        scales: Iterable[tuple[slice, Sequence[Scale]]],
        n_methods: int,
        rank: int | None = None,
        priced: int | None = None,
    ) -> Matrices:
        """M = scale ⊙ ∇val per parameter, [n_methods·Q, *shape], in float32 or wider.

        Built in one flat [n_methods·Q, N] buffer, one multiply per segment and method, each
        segment's scales used as soon as they are read (so they may live in scratch that the
        next segment reuses); each parameter's M is a view of the buffer, valid until the next
        call (the buffer is reused, so no step pays for a fresh allocation). With ``rank``,
        weight matrices that a kernel can contract in factored form also get rank-``rank``
        factors (fast mode), where that is cheaper for ``priced`` of their matrices (default: all;
        the fast mode's check of reuse adds matrices the step alone would not contract, and must
        not change what is factorised).
        """
        Q = val_grads.shape[0]
        G = val_grads.to(torch.promote_types(val_grads.dtype, torch.float32))
        shape = (n_methods * Q, self.numel)
        # not zeroed: only the covered runs get views (``_views``), and every one is written below
        compiling = torch.compiler.is_compiling()
        if compiling:  # a fresh buffer, whose memory the compiler plans
            flat = G.new_empty(shape)
        else:
            flat = self._workspace.get("M", shape, G.dtype, G.device)
        covered: list[slice] = []
        scalars: list[tuple[int, int, tuple[float, ...]]] = []  # runs of the layout scaled by scalars alone
        for where, per_method in scales:
            for k, scale in enumerate(per_method):
                if compiling:  # the compiler takes no out= that is not contiguous (Q > 1, a part of N)
                    flat[k * Q : (k + 1) * Q, where] = G[:, where] * scale
                else:
                    torch.mul(G[:, where], scale, out=flat[k * Q : (k + 1) * Q, where])
            covered.append(where)
            if not any(isinstance(scale, torch.Tensor) for scale in per_method):
                _add_run(scalars, where, tuple(float(scale) for scale in per_method))
        full = self._views(flat, covered)
        factors = {} if rank is None else self._factorize(full, rank, priced)
        return Matrices(full, factors, scalars)

    def _views(self, flat: torch.Tensor, covered: list[slice]) -> dict[int, torch.Tensor]:
        """id(param) → its M, a view of ``flat``, for the parameters in ``covered``; the same
        views as the last step's while the buffer and the segments are (a view per parameter
        per step costs more than the multiplies on a small model)."""
        if torch.compiler.is_compiling():  # traced once per graph: nothing to reuse, no address to read
            return self._new_views(flat, covered)
        key = ("M", tuple((c.start, c.stop) for c in covered))
        return self._workspace.views(key, flat, lambda buf: self._new_views(buf, covered))

    def _new_views(self, flat: torch.Tensor, covered: list[slice]) -> dict[int, torch.Tensor]:
        full = {}
        for p in self.parameters:
            where = self._slices[id(p)]
            if any(c.start <= where.start < c.stop for c in covered):
                full[id(p)] = flat[:, where].view(flat.shape[0], *p.shape)
        return full

    def _factorize(self, full: dict[int, torch.Tensor], rank: int, priced: int | None) -> dict[int, LowRank]:
        """Factors of the weight matrices whose low-rank contraction, the factorisation included,
        costs less than the exact one for this step's calls and ``priced`` matrices each (None: all;
        ``factorizing_pays``). The random draws do not depend on the number of matrices."""
        rows: dict[int, int] = {}  # id(param) -> rows (B·T) it is contracted with this step
        for call in self._calls:
            kernel, own = self._owned[call.module]
            for name in kernel.low_rank_params(call.module):
                if name in own and call.b is not None:
                    p = own[name]  # a weight [d_out, ...]: b has one row of d_out per position
                    n = call.b.shape[0]  # of which the last extra_rows are not contracted
                    positions = call.b.numel() // p.shape[0] * (n - self._extra_rows) // n
                    rows[id(p)] = rows.get(id(p), 0) + positions
        if self.total_rows is not None:
            rows = self.total_rows(rows)
        factors = {}
        for p in self.parameters:
            if id(p) not in rows or id(p) not in full:
                continue
            M = full[id(p)]
            d_out, d_in = M.shape[1], M[0].numel() // M.shape[1]
            if factorizing_pays(rows[id(p)], d_out, d_in, priced or M.shape[0], rank):
                factors[id(p)] = factorize(M.reshape(M.shape[0], d_out, d_in), rank, self._generator)
        self.last_factored = len(factors)
        return factors

    def contract(
        self, M: Matrices, batch_size: int, calls: list[Call] | None = None, rows: RowsTarget | None = None
    ) -> torch.Tensor:
        """[B, K]: every captured call's ⟨M_k, g_i⟩ for the B training rows, summed over calls.

        ``rows``: ∇val is the gradient of the extra rows (see ``RowsTarget``). A parameter whose M is
        then a scalar per method times it, and that one call alone uses, is valued by its kernel's
        ``rows_values`` from the rows' a and b, where that costs less than contracting M."""
        calls = self.captured(batch_size) if calls is None else calls
        B = batch_size
        # the rows' a and b are at hand, and some parameter's M is ∇val times scalars (else none qualifies)
        ghost_rows = rows is not None and self._extra_rows > 0 and bool(M.scalar_runs)
        # calls per parameter: the ghost route needs a parameter one call alone uses
        uses: Counter[int] = Counter()
        if ghost_rows:
            uses.update(id(p) for c in calls for p in self._owned[c.module][1].values())
        parts, total = [], None
        for call in calls:
            Mc = M.for_call(call.module, call.kernel, self._owned[call.module][1])
            if not Mc:
                continue
            dtype = matrix_dtype(Mc)  # float32 or wider, also under autocast
            assert call.b is not None  # captured() keeps the calls that got an output-gradient
            a, b = (call.a, call.b) if not self._extra_rows else (call.a[:B], call.b[:B])
            a, b = _cast(a, dtype), _cast(b, dtype)
            if ghost_rows:
                assert rows is not None  # ghost_rows says so
                v, Mc = self._rows_values(call, Mc, M, rows, uses, a, b)
                if v is not None:
                    total = v if total is None else total + v
                if not Mc:
                    continue
            parts.append(Part(call, a, b, Mc))
        for stack in self._stacks(parts, intermediate=True):
            if len(stack) == 1:
                v = self._values_in_chunks(stack[0])
            else:
                a, b = _stack(stack)
                Ms = {name: torch.stack([p.params[name] for p in stack]) for name in stack[0].params}
                v = stack[0].call.kernel.values_stacked([p.call.module for p in stack], a, b, Ms)
            total = v if total is None else total + v
        if total is None:
            total = torch.zeros(B, M.n_targets, device=calls[0].a.device)
        return total

    def kernel_values(self, M: Matrices, calls: list[Call]) -> torch.Tensor:
        """[R, K]: the rows of ``calls`` valued by each kernel's own ``values``, one call at a time (no
        stacks, chunks or ghost rows), summed over the calls: what the coverage check compares with
        the per-row gradients the same kernels build (``coverage._values_problem``)."""
        total = torch.zeros(calls[0].a.shape[0], M.n_targets, device=calls[0].a.device)
        for call in calls:
            Mc = M.for_call(call.module, call.kernel, self._owned[call.module][1])
            if Mc:
                dtype = matrix_dtype(Mc)
                assert call.b is not None  # captured() keeps the calls that got an output-gradient
                total = total + call.kernel.values(
                    call.module, _cast(call.a, dtype), _cast(call.b, dtype), Mc
                )
        return total

    def _rows_values(
        self,
        call: Call,
        Mc: dict,
        M: Matrices,
        rows: RowsTarget,
        uses: Counter,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> tuple[torch.Tensor | None, dict]:
        """This call's [B, K] values of its kernel's ``rows_params`` from the rows' a and b, and the M of
        its other parameters; (None, Mc) where they do not qualify or M costs less. They qualify where
        this call alone uses them (no cross terms between calls) and their M is ∇val times a scalar per
        method (``Matrices.scalars``)."""
        own = self._owned[call.module][1]
        names = [n for n in call.kernel.rows_params(call.module) if n in Mc]
        if not names or any(uses[id(own[n])] != 1 for n in names):
            return None, Mc
        scalars = {M.scalars(self._slices[id(own[n])]) for n in names}
        if len(scalars) != 1 or None in scalars:
            return None, Mc
        (per_method,) = scalars
        B, K = a.shape[0], M.n_targets
        assert call.b is not None  # the caller cut b from it
        a_rows, b_rows = _cast(call.a[B:], a.dtype), _cast(call.b[B:], b.dtype)
        ghost = call.kernel.rows_values(call.module, a, b, a_rows, b_rows, K)  # [B, R]
        if ghost is None:
            return None, Mc
        if rows.summed:
            ghost = ghost.sum(dim=1, keepdim=True)
        scales = torch.tensor(per_method, dtype=ghost.dtype, device=ghost.device) * rows.scale
        values = (scales[None, :, None] * ghost[:, None, :]).reshape(B, K)  # method-major, as M's rows
        return values, {n: m for n, m in Mc.items() if n not in names}

    def _stacks(self, parts: list[Part], intermediate: bool) -> list[list[Part]]:
        """The parts in stacks of one kernel ``group_key`` (and one set of parameters, dtypes and
        whether M is exact), each within ``stack_floats``: its copies of a, b and M and, with
        ``intermediate``, the kernel's intermediates for all its examples. Stacking pays only for
        small calls, whose cost is their dispatch: a bigger part is valued alone (in chunks where
        it must be), as is a part without a key."""
        if torch.compiler.is_compiling():  # a compiled graph has no dispatch to save: stacking only copies
            return [[part] for part in parts]
        key = (intermediate, self.stack_floats, tuple(map(self._plan_key, parts)))
        plan = self._stack_plans.get(key)
        if plan is None:
            if len(self._stack_plans) >= STACK_PLANS:  # shapes that vary from step to step
                self._stack_plans.clear()
            ids = {id(part): i for i, part in enumerate(parts)}
            plan = self._stack_plans[key] = [
                [ids[id(p)] for p in st] for st in self._new_stacks(parts, intermediate)
            ]
        return [[parts[i] for i in st] for st in plan]

    def _plan_key(self, part: Part) -> tuple:
        """What ``_new_stacks`` reads of a part: its module (and, for a module that may stack, its
        kernel's ``group_key``, which may read the module's attributes), the shapes and dtypes of a
        and b, and its parameters' names and shapes (a low-rank factorisation has none: it is
        never stacked)."""
        call, params = part.call, part.params
        shapes = [getattr(m, "shape", None) for m in params.values()]
        key = (call.module, part.a.shape, part.b.shape, part.a.dtype, part.b.dtype, *params, *shapes)
        if call.module in self._twinned:
            return (*key, call.kernel.group_key(call.module, part.a, part.b))
        return key

    def _new_stacks(self, parts: list[Part], intermediate: bool) -> list[list[Part]]:
        stacks: list[list[Part]] = []
        open_stacks: dict[object, tuple[list[Part], list[int]]] = {}  # key -> (stack, [its floats])
        for part in parts:
            key = _stack_key(part) if part.call.module in self._twinned else None
            floats = 0
            if key is not None:
                floats = part.a.numel() + part.b.numel() + sum(_floats(m) for m in part.params.values())
                floats += self._per_example_floats(part) * part.a.shape[0] if intermediate else 0
            if key is None or floats > self.stack_floats:
                stacks.append([part])
                continue
            kept = open_stacks.get(key)
            if kept is None or kept[1][0] + floats > self.stack_floats:
                kept = open_stacks[key] = ([], [0])
                stacks.append(kept[0])
            stack, size = kept
            stack.append(part)
            size[0] += floats
        return stacks

    def _per_example_floats(self, part: Part) -> int:
        """Floats the kernel's intermediates take per example (kept on the part: asked for twice)."""
        if part.per_example is None:
            call = part.call
            part.per_example = call.kernel.intermediate_floats(
                call.module, part.a, part.b, n_targets(part.params)
            )
        return part.per_example

    def _values_in_chunks(self, part: Part) -> torch.Tensor:
        """The kernel's [B, K] values, a chunk of examples at a time where its intermediate tensors
        would exceed ``contract_chunk`` floats (long sequences, big batches, many targets). Each
        example's value depends on its own rows only, so chunking changes no value."""
        call, a, b, Mc = part.call, part.a, part.b, part.params
        chunk = max(1, self.contract_chunk // max(1, self._per_example_floats(part)))
        B = a.shape[0]
        if chunk >= B:
            return call.kernel.values(call.module, a, b, Mc)
        parts = []
        for s in range(0, B, chunk):
            parts.append(call.kernel.values(call.module, a[s : s + chunk], b[s : s + chunk], Mc))
        return torch.cat(parts)

    def captured(self, batch_size: int) -> list[Call]:
        """The captured calls that got an output-gradient, each checked to hold one row per example."""
        calls = [c for c in self._calls if c.b is not None]
        if not calls:
            raise RuntimeError("no layer activity was captured: call values() inside capture()")
        rows = batch_size + self._extra_rows
        for call in calls:
            if call.a.shape[0] != rows:
                batch = f"a batch of {batch_size}" if batch_size else f"{self._extra_rows} validation rows"
                if batch_size and self._extra_rows:
                    batch += f" (+{self._extra_rows} validation rows)"
                # one row for many: an input made once for the whole batch, as transformers' positions are
                hint = "; a transformers model takes position_ids=torch.arange(T).expand(B, T)"
                raise UserError(
                    f"layer '{self._paths[call.module]}' ({type(call.module).__name__}) was called on "
                    f"{call.a.shape[0]} rows for {batch}: its per-example gradients cannot be separated "
                    "(is an input broadcast over the batch, such as positions from arange(T), or is the "
                    "layer applied along another dimension than the batch? expected the batch first"
                    f"{hint if call.a.shape[0] == 1 and isinstance(call.module, nn.Embedding) else ''})"
                )
        return calls


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """A call's inputs in the order of its forward's parameters, whether passed by position or by
    name (``lin(input=x)``), as a kernel's ``keep`` reads them."""
    if not kwargs:  # the usual call: nothing to bind (binding costs more than the rest of the hook)
        return args
    return inspect.signature(module.forward).bind(*args, **kwargs).args


@contextmanager
def modes_kept(modules: Sequence[nn.Module]):
    """Afterwards every module's train/eval mode is as before the block."""
    modes = [m.training for m in modules]
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.training = mode


def set_modes(modules: Sequence[nn.Module], training: bool) -> None:
    """Train or eval mode for every module, set directly: ``model.eval()``'s recursion costs more."""
    for m in modules:
        m.training = training


@dataclass
class Part:
    """One captured call's a and b (the rows it is asked about, cast) and its parameters: their M
    (``contract``) or the parameters themselves (``extra_gradients``), by name."""

    call: Call
    a: torch.Tensor
    b: torch.Tensor
    params: dict
    per_example: int | None = None  # floats of the kernel's intermediates per example, once asked


def _twinned(owned: Mapping[nn.Module, tuple[LayerKernel, dict[str, nn.Parameter]]]) -> set[nn.Module]:
    """The valued modules that share their kernel and parameter shapes with another: only their
    calls are keyed for stacking each step. (Two calls of one module without such a twin could
    stack too; that is rare, and they are valued one at a time.)"""
    by_shape: dict[object, list[nn.Module]] = {}
    for module, (kernel, own) in owned.items():
        if type(kernel).group_key is not LayerKernel.group_key:
            shapes = tuple((name, tuple(p.shape)) for name, p in own.items())
            by_shape.setdefault((type(kernel), shapes), []).append(module)
    return {m for group in by_shape.values() if len(group) > 1 for m in group}


def _stack_key(part: Part) -> object | None:
    """Parts of equal keys may be stacked (None: never): one kernel and ``group_key``, the same
    parameter names, dtypes, and exact M (a low-rank factorisation is contracted alone)."""
    if any(isinstance(m, LowRank) for m in part.params.values()):
        return None
    call = part.call
    key = call.kernel.group_key(call.module, part.a, part.b)
    if key is None:
        return None
    return (type(call.kernel), key, tuple(part.params), part.a.dtype, part.b.dtype)


def _stack(stack: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b of the stack's parts, stacked on a new leading dimension."""
    return torch.stack([p.a for p in stack]), torch.stack([p.b for p in stack])


def _add_run(
    runs: list[tuple[int, int, tuple[float, ...]]], where: slice, scalars: tuple[float, ...]
) -> None:
    """Append ``where`` to ``runs``, joined to the last run where it continues it with equal scalars
    (consecutive segments stepped alike), so that looking a parameter up scans few runs."""
    if runs and runs[-1][1] == where.start and runs[-1][2] == scalars:
        runs[-1] = (runs[-1][0], where.stop, scalars)
    else:
        runs.append((where.start, where.stop, scalars))


def _floats(m: torch.Tensor | LowRank) -> int:
    return m.numel() if isinstance(m, torch.Tensor) else 0


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the contraction dtype; token ids stay as they are."""
    return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


@dataclass
class Matrices:
    """The per-parameter M of one step, and low-rank factors of some (fast mode)."""

    full: dict[int, torch.Tensor]  # id(param) -> [K, *shape]
    factors: dict[int, LowRank]  # id(param) -> factors of the same stack
    # runs [start, stop) of the layout where each method's scale is a scalar, with those scalars
    scalar_runs: list[tuple[int, int, tuple[float, ...]]] = field(default_factory=list)

    def scalars(self, where: slice) -> tuple[float, ...] | None:
        """Each method's scalar where M is ∇val times a scalar per method all over ``where`` (else None)."""
        for start, stop, per_method in self.scalar_runs:
            if start <= where.start and where.stop <= stop:
                return per_method
        return None

    @property
    def n_targets(self) -> int:
        return next(iter(self.full.values())).shape[0] if self.full else 0

    def for_call(self, module: nn.Module, kernel: LayerKernel, own: dict[str, nn.Parameter]) -> dict:
        factored = kernel.low_rank_params(module)
        out: dict[str, torch.Tensor | LowRank] = {}
        for name, p in own.items():
            if name in factored and id(p) in self.factors:
                out[name] = self.factors[id(p)]
            elif id(p) in self.full:
                out[name] = self.full[id(p)]
        return out
