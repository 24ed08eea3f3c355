"""A pass the valuation adds leaves a model's buffers as it found them (engine/buffers.py)."""

import pytest
import torch
from torch import nn

from adamshap_core.engine.buffers import Buffers, buffers_kept
from adamshap_core.errors import UserError


def _model() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    m.register_buffer("count", torch.zeros(()))
    m[0].register_buffer("stats", torch.arange(3.0))
    m.register_buffer("absent", None)
    return m


def test_a_buffer_changed_in_place_or_replaced_is_put_back():
    m = _model()
    count, stats = m.count, m[0].stats
    with buffers_kept(m) as kept:
        m.count += 1  # in place
        m[0].stats = torch.ones(3)  # replaced
        assert sorted((path, name) for path, name, _ in kept.changed()) == [("", "count"), ("0", "stats")]
    assert m.count is count and float(m.count) == 0
    assert m[0].stats is stats and torch.equal(stats, torch.arange(3.0))
    assert m.absent is None


def test_buffers_left_alone_are_not_changed_and_not_copied_back():
    m = _model()
    kept = Buffers(m)
    version = m[0].stats._version
    assert kept.changed() == []
    kept.restore()
    assert m[0].stats._version == version  # no copy where nothing changed


def test_a_buffer_a_pass_adds_is_taken_away_and_refused():
    """State a module makes on its first call: taken away with the rest, it could leave the module
    half made (a flag set beside it), so the pass is refused, naming it."""
    m = _model()
    with pytest.raises(UserError, match=r"'0' registered a buffer 'made'"), buffers_kept(m):
        m[0].register_buffer("made", torch.ones(1))
    assert "made" not in m[0]._buffers


def test_only_the_buffers_named_are_copied_and_a_change_to_another_is_refused():
    m = _model()
    kept = Buffers(m, copied={id(m.count)})
    m.count += 1
    m[0].stats.add_(1)
    with pytest.raises(UserError, match=r"'0' changed its buffer 'stats' in the validation pass"):
        kept.restore()
    assert float(m.count) == 0  # the copied one is put back all the same


def test_an_inference_tensor_buffer_is_compared_by_value_nan_included():
    """An inference tensor keeps no version counter: what changed is told by its values, where a
    NaN left alone is no change."""
    m = nn.Module()
    with torch.inference_mode():
        m.register_buffer("table", torch.tensor([0.0, float("nan")]))
    with buffers_kept(m, copied=set()) as kept:
        assert kept.changed() == []
        with torch.inference_mode():
            m.table.add_(1)
        assert [(path, name) for path, name, _ in kept.changed()] == [("", "table")]
    assert m.table[0] == 0 and m.table[1].isnan()


def test_a_lazy_modules_uninitialised_buffers_are_left_to_it():
    """Its first call initialises them, in plain training as in a pass the valuation adds."""
    m = nn.Sequential(nn.Linear(2, 3), nn.LazyBatchNorm1d(affine=False)).eval()
    with buffers_kept(m):
        m(torch.randn(4, 2))
    assert m[1].running_mean.shape == (3,)
