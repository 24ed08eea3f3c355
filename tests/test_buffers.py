"""A pass the valuation adds leaves a model's buffers as it found them (engine/buffers.py)."""

import torch
from torch import nn

from adamshap_core.engine.buffers import Buffers, buffers_kept


def _module() -> nn.Module:
    m = nn.Module()
    m.register_buffer("count", torch.zeros(()))
    m.register_buffer("stats", torch.arange(3.0))
    m.register_buffer("absent", None)
    return m


def test_a_buffer_changed_in_place_replaced_or_added_is_put_back():
    m = _module()
    count, stats = m.count, m.stats
    with buffers_kept([m]) as kept:
        m.count += 1  # in place
        m.stats = torch.ones(3)  # replaced
        m.register_buffer("added", torch.ones(1))
        assert sorted(name for _, name in kept.changed()) == ["added", "count", "stats"]
    assert m.count is count and float(m.count) == 0
    assert m.stats is stats and torch.equal(stats, torch.arange(3.0))
    assert "added" not in m._buffers and m.absent is None


def test_buffers_left_alone_are_not_changed_and_not_copied_back():
    m = _module()
    kept = Buffers([m])
    version = m.stats._version
    assert kept.changed() == []
    kept.restore()
    assert m.stats._version == version  # no copy where nothing changed


def test_an_inference_tensor_buffer_is_compared_by_value():
    """An inference tensor keeps no version counter: what changed is told by its values."""
    m = nn.Module()
    with torch.inference_mode():
        m.register_buffer("table", torch.zeros(2))
    with buffers_kept([m]) as kept:
        assert kept.changed() == []
        with torch.inference_mode():
            m.table.add_(1)
        assert kept.changed() == [(m, "table")]
    assert not m.table.any()
