"""Every layer kernel against brute-force per-example gradients (float64)."""

import gc
import weakref

import pytest
import torch
from bruteforce import dot_products, per_example_grads
from cases import CASES, PER_IMAGE_CONV, PerImageConv, cross_entropy
from conftest import rel_err
from torch import nn

from adamshap_core.engine import GhostEngine
from adamshap_core.errors import UserError


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("batch, chunked", [(1, False), (5, False), (5, True)], ids=["1", "5", "5-chunked"])
@pytest.mark.parametrize("targets", ["one", "six"])
def test_kernel_matches_per_example_gradients(case, batch, chunked, targets, float64):
    """Every kernel's ⟨M, g_i⟩ against brute force: one matrix per parameter (one method, one
    validation target: the kernels' K = 1 shortcuts), or six (a scalar and an elementwise scale,
    three targets); calls of equal shapes stacked (the default budget), or each alone and chunked."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = case.model()
    x, y = case.data(batch, gen)
    engine = GhostEngine(model)
    if chunked:  # a budget below one example's intermediates: every kernel contracts one example at a time,
        engine.contract_chunk = 1
        engine.stack_floats = 0  # every call alone (a stack is contracted whole, never in chunks)
    names = {id(p): n for n, p in model.named_parameters()}
    Q, n_methods = (1, 1) if targets == "one" else (3, 2)
    val = [torch.randn(Q, *p.shape, generator=gen) for p in engine.parameters]
    elementwise = [torch.rand(p.shape, generator=gen) for p in engine.parameters]
    # per parameter: an elementwise scale, and with six targets first a scalar one
    per_method = [[s] if n_methods == 1 else [1.0, s] for s in elementwise]
    scales = [
        (engine.slice_of(p), [s if isinstance(s, float) else s.reshape(-1) for s in methods])
        for p, methods in zip(engine.parameters, per_method, strict=True)
    ]
    with engine.capture():
        case.loss(model(x), y).mean().backward()
        got = engine.values(engine.flatten(val, rows=Q), scales, n_methods, batch)  # [B, methods, Q]
    G = per_example_grads(model, case.loss, x, y)
    want = torch.zeros(batch, n_methods, Q)
    for p, v, methods in zip(engine.parameters, val, per_method, strict=True):
        g = G[names[id(p)]].reshape(batch, -1)
        for m, scale in enumerate(methods):
            M = (scale * v).reshape(Q, -1)
            want[:, m] += g @ M.T / batch
    assert got.shape == (batch, n_methods, Q)
    assert rel_err(got, want) <= 1e-10


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch < 2.4 has no nn.RMSNorm")
def test_an_rms_norm_without_eps_normalises_with_its_dtypes_epsilon(float64):
    """nn.RMSNorm(d) defaults to eps=None, where torch takes finfo(dtype).eps: on inputs of RMS about
    1e-3, any other eps would show in the weight's values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.RMSNorm(4), nn.Linear(4, 2))
    x, y = 1e-3 * torch.randn(5, 4), torch.randint(0, 2, (5,))
    engine = GhostEngine(model)
    val = [torch.randn(1, *p.shape) for p in engine.parameters]
    with engine.capture():
        cross_entropy(model(x), y).mean().backward()
        scales = [(engine.slice_of(p), [1.0]) for p in engine.parameters]
        got = engine.values(engine.flatten(val, rows=1), scales, 1, 5)
    grads = per_example_grads(model, cross_entropy, x, y)
    names = {id(p): n for n, p in model.named_parameters()}
    pairs = zip(engine.parameters, val, strict=True)
    want = sum(grads[names[id(p)]].reshape(5, -1) @ v.reshape(-1, 1) / 5 for p, v in pairs)
    assert rel_err(got.reshape(5, 1), want) <= 1e-10


def test_contraction_splits_the_batch_where_intermediates_exceed_the_budget(float64, monkeypatch):
    from adamshap_core.engine.linear import LinearKernel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    engine = GhostEngine(model)
    x = torch.randn(7, 3, 6)  # per example: 2 · K · max(3·6, 3·4) = 2 · 2 · 18 floats
    engine.contract_chunk = 2 * 2 * 18 * 3  # three examples' worth
    seen = []
    values = LinearKernel.values
    monkeypatch.setattr(
        LinearKernel, "values", lambda self, m, a, b, M: seen.append(len(a)) or values(self, m, a, b, M)
    )
    val = engine.flatten([torch.randn(1, *p.shape) for p in engine.parameters], rows=1)
    with engine.capture():
        model(x).sum().backward()
        chunked = engine.values(val, [(slice(0, engine.numel), [1.0, 1.0])], 2, 7)
        engine.contract_chunk = 1 << 26
        whole = engine.values(val, [(slice(0, engine.numel), [1.0, 1.0])], 2, 7)
    assert seen == [3, 3, 1, 7]
    assert rel_err(chunked, whole) <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("summed", [False, True], ids=["per-row", "summed"])
def test_gradients_of_rows_after_the_batch_match_per_example_gradients(case, summed, float64):
    """The rows appended after a batch of 4 (validation rows): each kernel's per-row gradients,
    assembled per parameter (a tied one over both its uses), or their sum over the rows."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = case.model()
    x, y = case.data(7, gen)
    x, y = x.flip(0), y.flip(0)  # the lm cases pad their first example: make it an appended row
    engine = GhostEngine(model)
    names = {id(p): n for n, p in model.named_parameters()}
    with engine.capture(extra_rows=3):
        case.loss(model(x), y).sum().backward()
        got = engine.extra_gradients(4, summed)
        middle = engine.extra_gradients(4, summed, rows=slice(1, 2))  # the second appended row alone
    G = per_example_grads(model, case.loss, x, y)
    assert set(got) == set(middle) == {id(p) for p in engine.parameters}
    for p in engine.parameters:
        want = G[names[id(p)]][4:]
        want = want.sum(0, keepdim=True) if summed else want
        assert got[id(p)].shape == want.shape
        assert rel_err(got[id(p)], want) <= 1e-12, names[id(p)]
        assert rel_err(middle[id(p)], G[names[id(p)]][5:6]) <= 1e-12, names[id(p)]


def _one_image_and_its_matrices(engine, gen, Q=3):
    """A batch of one image and its label, and the engine's scales of two methods (a scalar, an
    elementwise one) with Q random validation targets: x, y, the flat ∇val, the scales, and each
    parameter's M by name, [2·Q, *shape]."""
    x, y = PER_IMAGE_CONV.data(1, gen)
    names = {id(p): n for n, p in engine.model.named_parameters()}
    val = [torch.randn(Q, *p.shape, generator=gen) for p in engine.parameters]
    elementwise = [torch.rand(p.shape, generator=gen) for p in engine.parameters]
    scales = [
        (engine.slice_of(p), [1.0, s.reshape(-1)])
        for p, s in zip(engine.parameters, elementwise, strict=True)
    ]
    M = {
        names[id(p)]: torch.cat([v, s * v])
        for p, v, s in zip(engine.parameters, val, elementwise, strict=True)
    }
    return x, y, engine.flatten(val, rows=Q), scales, M


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("route", ["exact", "chunked", "factored"])
def test_a_conv2d_called_on_an_unbatched_image_is_valued_as_a_batch_of_one(bias, route, float64, monkeypatch):
    """Conv2d takes an unbatched (C, H, W) input, and its kernel keeps such a call's input as a batch of
    one, and its output-gradient too ([1, C_out, H', W']): a batch of one image through it, valued
    against torch.func for two methods × three validation targets; whole, one example at a time, or
    through factors at a rank that holds M whole (the cost rule forced)."""
    from adamshap_core.engine import ghost

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = PerImageConv(bias)
    engine = GhostEngine(model)
    rank = None
    if route == "chunked":
        engine.contract_chunk, engine.stack_floats = 1, 0
    if route == "factored":
        monkeypatch.setattr(ghost, "factorizing_pays", lambda *args: True)
        rank = 64
    x, y, val, scales, M = _one_image_and_its_matrices(engine, gen)
    with engine.capture():
        cross_entropy(model(x), y).mean().backward()
        conv = next(c for c in engine.captured(1) if c.module is model.conv)
        assert conv.a.shape == (1, 2, 6, 6) and conv.b.shape == (1, 3, 3, 7)  # both kept batched
        matrices = engine.matrices(val, scales, 2, rank=rank)
        got = engine.contract(matrices, 1)
    assert (id(model.conv.weight) in matrices.factors) == (route == "factored")
    assert rel_err(got, dot_products(per_example_grads(model, cross_entropy, x, y), M)) <= 1e-10


def test_a_conv2d_called_on_each_unbatched_image_of_a_batch_is_refused_by_name(float64):
    """Three images, each through the Conv2d alone: three calls of one row each, which cannot be told
    apart as the batch's examples. The values are refused with the layer's name, not given wrong."""
    gen = torch.Generator().manual_seed(0)
    model = PerImageConv()
    engine = GhostEngine(model)
    x, y = PER_IMAGE_CONV.data(3, gen)
    val = engine.flatten([torch.randn(1, *p.shape, generator=gen) for p in engine.parameters], rows=1)
    with engine.capture():
        cross_entropy(model(x), y).mean().backward()
        refused = r"layer 'conv' \(Conv2d\) was called on 1 rows for a batch of 3"
        with pytest.raises(UserError, match=refused) as e:
            engine.values(val, [(slice(0, engine.numel), [1.0])], 1, 3)
    assert "position_ids" not in str(e.value)  # the hint for positions made once, which go to an Embedding


def test_positions_made_once_for_the_batch_are_refused_with_the_hint_for_them():
    """An Embedding of positions arange(T) of one row, broadcast over the batch: the refusal says how a
    transformers model is given positions per row."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])).mean(1)

    model = Positions()
    engine = GhostEngine(model)
    ids = torch.randint(0, 7, (3, 5))
    val = engine.flatten([torch.zeros(1, *p.shape) for p in engine.parameters], rows=1)
    with engine.capture():
        cross_entropy(model(ids), torch.tensor([0, 1, 2])).mean().backward()
        with pytest.raises(UserError, match=r"layer 'pos' \(Embedding\) was called on 1 rows.*position_ids"):
            engine.values(val, [(slice(0, engine.numel), [1.0])], 1, 3)


@pytest.mark.parametrize("rows", [None, slice(0, 1)], ids=["all-rows", "row-0"])
def test_the_gradient_of_an_unbatched_conv2d_call_as_an_appended_row(rows, float64):
    """One image, appended after an empty batch (a validation row, as the start-up check and fused
    validation take it), through an unbatched Conv2d call: its gradient rebuilt by the kernels, for
    all appended rows or the first picked out, against torch.func."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = PerImageConv()
    engine = GhostEngine(model)
    names = {id(p): n for n, p in model.named_parameters()}
    x, y = PER_IMAGE_CONV.data(1, gen)
    with engine.capture(extra_rows=1):
        cross_entropy(model(x), y).sum().backward()
        got = engine.extra_gradients(0, summed=False, rows=rows)
    G = per_example_grads(model, cross_entropy, x, y)
    assert set(got) == {id(p) for p in engine.parameters}
    for p in engine.parameters:
        assert rel_err(got[id(p)], G[names[id(p)]]) <= 1e-12, names[id(p)]


def test_the_ghost_dot_product_with_rows_is_that_of_their_gradients(float64, monkeypatch):
    """⟨G_r, g_i⟩ from a and b alone equals the dot product of the gradients formed outright."""
    from adamshap_core.engine import linear

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 6, generator=gen)
    a_rows, b_rows = torch.randn(2, 7, 3, generator=gen), torch.randn(2, 7, 6, generator=gen)
    g = torch.einsum("bto,bti->boi", b, a)
    g_rows = torch.einsum("rso,rsi->roi", b_rows, a_rows)
    want = torch.einsum("boi,roi->br", g, g_rows)
    assert rel_err(linear.contract_rows(a, b, a_rows, b_rows), want) <= 1e-12
    monkeypatch.setattr(linear, "PER_EXAMPLE_CHUNK", 2 * 4 * 2 * 7 * 2)  # chunks of 2 examples: 3 chunks
    assert rel_err(linear.contract_rows(a, b, a_rows, b_rows), want) <= 1e-12
    # chosen where it saves multiply-adds: wide layers and few row positions, not narrow ones or many rows
    assert linear.rows_cheaper(9, 256, 256, rows=9, K=1)
    assert not linear.rows_cheaper(9, 32, 32, rows=9, K=1)
    assert not linear.rows_cheaper(9, 256, 256, rows=200 * 9, K=1)


def test_per_target_validation_gradients_in_chunks_equal_one_pass(float64):
    """Per target, the validation rows are taken ``val_chunk`` at a time: 7 rows in chunks of 2 (the
    last one short) give the gradients of one pass over all 7."""
    case = next(c for c in CASES if c.name == "lm-tied")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model()
    vx, vy = case.data(7, gen)
    whole, loss = GhostEngine(model).validation_gradients(case.loss, vx, vy, per_target=True)
    chunked, loss_c = GhostEngine(model, val_chunk=2).validation_gradients(case.loss, vx, vy, per_target=True)
    assert whole.shape[0] == 7
    assert rel_err(chunked, whole) <= 1e-12 and abs(float(loss_c) - float(loss)) <= 1e-12


def test_tied_parameter_is_valued_once_through_both_uses(float64):
    case = next(c for c in CASES if c.name == "lm-tied")
    model = case.model()
    engine = GhostEngine(model)
    assert sum(p is model.tok.weight for p in engine.parameters) == 1


def _values_of(model, loss_fn, x, y, val):
    engine = GhostEngine(model)
    with engine.capture():
        loss_fn(model(x), y).mean().backward()
        return engine.values(val, [(slice(0, engine.numel), [1.0])], 1, len(y))


def test_a_loss_that_changes_the_model_output_in_place_is_valued_as_one_that_does_not(float64):
    """The last layer's output is what the model returns; a loss that scales it in place must not make
    the engine read the gradient of the scaled tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    val = torch.randn(1, sum(p.numel() for p in model.parameters()))

    def scaled(out, y, in_place):
        out = out.mul_(3.0) if in_place else out * 3.0
        return nn.functional.cross_entropy(out, y, reduction="none")

    got = _values_of(model, lambda o, t: scaled(o, t, True), x, y, val)
    want = _values_of(model, lambda o, t: scaled(o, t, False), x, y, val)
    assert rel_err(got, want) <= 1e-12


def test_a_layer_output_the_loss_changes_in_place_is_valued_as_if_it_did_not(float64):
    """Changed after the model returned, by the loss, through a tensor the model kept: b is still the
    gradient of the layer's output as the layer made it."""

    class Keeps(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            self.kept = self.hidden(x)
            return self.head(torch.tanh(self.kept))

    torch.manual_seed(0)
    model = Keeps()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    val = torch.randn(1, sum(p.numel() for p in model.parameters()))

    def loss(out, y, in_place):
        if in_place:
            model.kept.mul_(2.0)  # tanh kept its output, not its input: autograd allows this
        return nn.functional.cross_entropy(out, y, reduction="none")

    got = _values_of(model, lambda o, t: loss(o, t, True), x, y, val)
    want = _values_of(model, lambda o, t: loss(o, t, False), x, y, val)
    assert rel_err(got, want) <= 1e-12


def test_no_captured_call_outlives_its_capture():
    """A call is held by the hook that receives its b: nothing the hook's tensor or node keeps may hold it
    in turn, or every step would leak its tensors (a cycle through autograd's C++ that no collector frees)."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    engine = GhostEngine(model)
    with engine.capture():
        nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
        calls = [weakref.ref(call) for call in engine.captured(6)]
    gc.collect()
    assert len(calls) == 2 and all(call() is None for call in calls)


def test_unsupported_layer_is_a_startup_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(UserError, match=r"'1' \(BatchNorm1d\).*no kernel"):
        GhostEngine(model)


def test_parameter_outside_any_module_is_an_error():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    with pytest.raises(UserError, match="Scaled.*scale"):
        GhostEngine(Scaled())


def test_a_kernel_without_per_row_gradients_cannot_be_registered():
    """The start-up check compares every kernel's per-row gradients with autograd's: a kernel must
    build them."""
    from adamshap_core.engine.registry import _KERNELS, LayerKernel, register

    class Scale(nn.Module):
        pass

    class ValuesOnly(LayerKernel):
        param_names = ("weight",)

        def values(self, module, a, b, M):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="ValuesOnly does not define gradients"):
        register(Scale)(ValuesOnly)
    assert Scale not in _KERNELS


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for p in model[1].parameters():
        p.requires_grad_(False)
    assert len(GhostEngine(model).parameters) == 2


@pytest.mark.parametrize(
    "module",
    [
        nn.Embedding(5, 3, max_norm=1.0),
        nn.Embedding(5, 3, scale_grad_by_freq=True),
        nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_kernel_rejects_configurations_it_cannot_value(module):
    with pytest.raises(UserError, match="cannot be valued"):
        GhostEngine(nn.Sequential(module))


@pytest.mark.parametrize("T,K", [(1, 1), (1, 5), (7, 1), (7, 5)])
@pytest.mark.parametrize("d_in,d_out", [(3, 8), (8, 3)])
@pytest.mark.parametrize("G", [1, 3])
def test_linear_contraction_orders_agree_with_the_definition(T, K, d_in, d_out, G, float64, monkeypatch):
    """Both orders of Σ_g Σ_t b_tᵀ M_k a_t (through M, through per-example gradients), chunked too,
    for one layer and for G stacked ones; with a bias's Σ_t b_tᵀ m_k added in the same product."""
    from adamshap_core.engine import linear

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(G, 6, T, d_in, generator=gen), torch.randn(G, 6, T, d_out, generator=gen)
    M = torch.randn(G, K, d_out, d_in, generator=gen)
    Mb = torch.randn(G, K, d_out, generator=gen)
    want = torch.einsum("gbto,gkoi,gbti->bk", b, M, a)
    assert rel_err(linear.contract_stacked(a, b, M), want) <= 1e-12
    with_bias = want + torch.einsum("gbto,gko->bk", b, Mb)
    assert rel_err(linear.contract_stacked(a, b, M, Mb), with_bias) <= 1e-12
    with monkeypatch.context() as patched:  # past the fold's budget: the bias in a product of its own
        patched.setattr(linear, "FOLD_FLOATS", 0)
        assert rel_err(linear.contract_stacked(a, b, M, Mb), with_bias) <= 1e-12
    assert rel_err(linear._through_per_example_gradients(a, b, M), want) <= 1e-12
    if G == 1:
        assert rel_err(linear.contract(a[0], b[0], M[0]), want) <= 1e-12
    monkeypatch.setattr(linear, "PER_EXAMPLE_CHUNK", G * d_in * d_out * 4)  # chunks of 4 examples
    assert rel_err(linear._through_per_example_gradients(a, b, M), want) <= 1e-12


def test_stacks_kept_from_an_earlier_step_serve_only_calls_of_its_shapes(float64, monkeypatch):
    """The engine keeps each step's stacks for the next; a batch of another size, whose calls fit the
    stack budget differently, is stacked anew (as a fresh engine stacks it), with the same values."""
    from cases import Stacked

    from adamshap_core.engine.linear import LinearKernel

    seen: list[int] = []
    original = LinearKernel.values_stacked
    monkeypatch.setattr(
        LinearKernel,
        "values_stacked",
        lambda self, ms, *rest: seen.append(len(ms)) or original(self, ms, *rest),
    )
    torch.manual_seed(0)
    model = Stacked()
    kept = GhostEngine(model)

    def step(engine, x):
        engine.stack_floats = 2000
        seen.clear()
        val = engine.flatten([torch.ones(1, *p.shape) for p in engine.parameters], rows=1)
        with engine.capture():
            model(x).sum().backward()
            v = engine.values(val, [(slice(0, engine.numel), [1.0])], 1, len(x))
        model.zero_grad()
        return v, sorted(seen)

    planned = []  # the batch sizes whose stacks the kept engine formed anew
    new_stacks = kept._new_stacks
    monkeypatch.setattr(
        kept, "_new_stacks", lambda parts, *rest: planned.append(len(x)) or new_stacks(parts, *rest)
    )
    stacked = {}
    for batch in (2, 12, 2):
        x = torch.randn(batch, 4, 5)
        fresh = GhostEngine(model)
        want, want_stacks = step(fresh, x)
        fresh.remove()
        got, stacked[batch] = step(kept, x)
        assert stacked[batch] == want_stacks
        assert rel_err(got, want) <= 1e-12
    assert stacked[2] != stacked[12]  # the budget stacks the two sizes differently
    assert planned == [2, 12]  # the second batch of 2 took the stacks kept from the first


def test_kept_stacks_follow_a_change_of_a_module_attribute_in_the_stacking_key(float64):
    """Two LayerNorms stack while their eps are equal; after one's eps changes, the engine that kept
    the earlier step's stacks values them apart, as a fresh engine does."""
    from cases import Stacked

    torch.manual_seed(0)
    model = Stacked()
    kept = GhostEngine(model)
    x = torch.randn(3, 4, 5)

    def values(engine):
        val = engine.flatten([torch.ones(1, *p.shape) for p in engine.parameters], rows=1)
        with engine.capture():
            model(x).sum().backward()
            v = engine.values(val, [(slice(0, engine.numel), [1.0])], 1, len(x))
        model.zero_grad()
        return v

    values(kept)
    model.ln2.eps = 3.0
    fresh = GhostEngine(model)
    want = values(fresh)
    fresh.remove()
    assert rel_err(values(kept), want) <= 1e-12


@pytest.mark.parametrize("summed", [False, True], ids=["per-row", "summed"])
def test_calls_of_equal_shapes_are_stacked_and_value_as_alone(summed, float64, monkeypatch):
    """Stacked contraction and rows' gradients equal every call alone; the stacks really form."""
    from cases import Stacked

    from adamshap_core.engine.registry import LayerKernel

    torch.manual_seed(0)
    model = Stacked()
    x = torch.randn(9, 4, 5)
    engine = GhostEngine(model)
    val = engine.flatten([torch.randn(2, *p.shape) for p in engine.parameters], rows=2)
    scales = [(slice(0, engine.numel), [1.0, 0.5])]
    seen = []  # (method, calls stacked)

    def counted(name, original):
        return lambda self, modules, *rest: (
            seen.append((name, len(modules))) or original(self, modules, *rest)
        )

    kernels = {type(k) for k, _ in engine._owned.values()}
    for name in ("values_stacked", "gradients_stacked"):
        owners = {c for k in kernels for c in k.__mro__ if name in vars(c) and c is not LayerKernel}
        for owner in owners:
            monkeypatch.setattr(owner, name, counted(name, vars(owner)[name]))
    results, stacked = {}, {}
    # the default budget, every call alone, and a budget that splits the three-call stack
    for stack_floats in (engine.stack_floats, 0, 3000):
        engine.stack_floats = stack_floats
        seen.clear()
        with engine.capture(extra_rows=3):
            model(x).sum().backward()
            v = engine.values(val, scales, 2, 6)
            g = engine.extra_gradients(6, summed)
        results[stack_floats], stacked[stack_floats] = (v, g), sorted(seen)
    (v1, g1), (v0, g0), (v2, g2) = results.values()
    for v, g in ((v1, g1), (v2, g2)):
        assert rel_err(v, v0) <= 1e-12
        assert g.keys() == g0.keys() and all(rel_err(g[k], g0[k]) <= 1e-12 for k in g0)
    # Linear a, b (three calls, one module twice), the two LayerNorms, the two RMSNorms; c stacks alone
    default, alone, small = stacked.values()
    assert ("values_stacked", 3) in default and ("gradients_stacked", 3) in default
    assert default.count(("values_stacked", 2)) == (2 if hasattr(torch.nn, "RMSNorm") else 1)
    assert alone == []
    # the three Linear calls' contraction no longer fits one stack of 3000 floats: two and one
    assert ("values_stacked", 3) not in small and ("values_stacked", 2) in small
    assert LayerKernel.group_key(None, None, None, None) is None  # a custom kernel stacks nothing
