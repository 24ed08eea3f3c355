"""Inputs and targets given as dicts or tuples of tensors (batches.py) are checked and valued as the same
rows given as plain tensors are."""

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from cases import cross_entropy
from torch import nn

from adamshap_core import InRunShapley
from adamshap_core.batches import is_empty, n_rows, pick_rows, take_rows
from adamshap_core.errors import UserError

Weighted = namedtuple("Weighted", ["labels", "weights"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class DictNet(Net):
    """The same network, taking {"x": rows, "scale": a number that is not a row}."""

    def forward(self, batch):
        return super().forward(batch["x"] * batch["scale"])


def weighted_loss(out, y):
    return cross_entropy(out, y.labels) * y.weights


def _data(n, gen):
    return (
        torch.randn(n, 5, generator=gen),
        torch.randint(0, 3, (n,), generator=gen),
        torch.rand(n, generator=gen),
    )


@pytest.mark.parametrize("per_target", [False, True], ids=["mean", "per-target"])
def test_dict_inputs_and_named_tuple_targets_are_valued_as_tensors(per_target, float64):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = Net()
    nested = DictNet()
    nested.load_state_dict(plain.state_dict())
    vx, vy, vw = _data(3, gen)
    as_tensors = InRunShapley(
        plain,
        torch.optim.Adam(plain.parameters(), lr=1e-2),
        lambda out, y: cross_entropy(out, y[:, 0].long()) * y[:, 1],
        vx,
        torch.stack([vy.double(), vw], 1),
        ("adam", "sgd"),
        per_target=per_target,
    )
    as_nested = InRunShapley(
        nested,
        torch.optim.Adam(nested.parameters(), lr=1e-2),
        weighted_loss,
        {"x": vx, "scale": 1.0},
        Weighted(vy, vw),
        ("adam", "sgd"),
        per_target=per_target,
    )
    for _ in range(3):
        x, y, w = _data(4, gen)
        want = as_tensors.step(x, torch.stack([y.double(), w], 1))
        got = as_nested.step({"x": x, "scale": 1.0}, Weighted(y, w))
        assert got.loss == pytest.approx(want.loss, rel=1e-12)
        for m in ("adam", "sgd"):
            assert got.values[m].shape == want.values[m].shape
            assert torch.allclose(got.values[m], want.values[m], rtol=1e-10, atol=1e-16)
    for p, q in zip(plain.parameters(), nested.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)


class TiedOutside(nn.Module):
    """A head tied to the embedding through F.linear, where no hook sees it; inputs in a dict."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, batch):
        return F.linear(torch.tanh(self.mid(self.tok(batch["ids"]))), self.tok.weight)


def test_a_weight_used_outside_its_module_is_refused_with_dict_inputs_too():
    gen = torch.Generator().manual_seed(0)
    model = TiedOutside()
    ids, targets = torch.randint(0, 11, (3, 5), generator=gen), torch.randint(0, 11, (3, 5), generator=gen)

    def loss(out, y):
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserError, match="gradient of 'tok.weight' is not what its module's hooks capture"):
        InRunShapley(model, opt, loss, {"ids": ids}, targets, ("sgd",))


def test_the_helpers_cut_every_tensor_with_rows_and_pass_the_rest_along():
    batch = {"x": torch.arange(12).view(4, 3), "pair": (torch.arange(4), "tag"), "scale": torch.tensor(2.0)}
    assert n_rows(batch) == 4 and n_rows(("a", 1)) is None and n_rows(torch.tensor(1.0)) is None
    cut = take_rows(batch, 1, 3)
    assert torch.equal(cut["x"], batch["x"][1:3]) and torch.equal(cut["pair"][0], torch.tensor([1, 2]))
    assert cut["pair"][1] == "tag" and cut["scale"] is batch["scale"]
    picked = pick_rows(Weighted(torch.arange(4), torch.arange(4.0)), torch.tensor([3]))
    assert isinstance(picked, Weighted) and picked.labels.tolist() == [3] and picked.weights.tolist() == [3.0]
    assert is_empty({"x": torch.zeros(0, 3)}) and is_empty([]) and not is_empty(Weighted(*batch["pair"]))
