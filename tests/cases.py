"""Small models, one per layer type and combination, for the exactness tests (float64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def sequence_cross_entropy(logits, y):
    """Mean next-token loss over each example's real tokens (-100 = padding)."""
    mask = (y != -100).to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none")
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1)


class SeqLinear(nn.Module):
    """Linear layers applied to a [B, T, d] sequence, pooled at the end; the second called by keyword."""

    def __init__(self, d_in, d_hidden, n_out, bias):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, n_out, bias=not bias)

    def forward(self, x):
        # one layer called by keyword: the hooks must find its input there too
        return self.down(input=torch.tanh(self.up(x))).mean(1)


class ValidConvNet(nn.Module):
    """Convolutions without bias: a rectangular kernel, stride (2, 1) and padding "valid", then a depthwise
    one (as many groups as channels)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding="valid", bias=False)
        self.c2 = nn.Conv2d(4, 4, 1, groups=4, bias=False)
        self.head = nn.Linear(4 * 2 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class PerImageConv(nn.Module):
    """A Conv2d called on each image alone, unbatched (C, H, W): rectangular, strided and padded; then a
    head over the batch. A batch of one is one call, which the Conv2d kernel takes as a batch of one."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, bias=bias)
        self.head = nn.Linear(3 * 3 * 7, 3)

    def forward(self, x):  # x [B, 2, 6, 6]
        return self.head(torch.stack([torch.tanh(self.conv(image)) for image in x]).flatten(1))


class Norms2d(nn.Module):
    """A LayerNorm and an RMSNorm over the last two dimensions of a [B, T, d] sequence (their
    parameters [T, d])."""

    def __init__(self, T=4, d=5, k=3):
        super().__init__()
        self.ln = nn.LayerNorm((T, d), eps=0.3)
        self.rms = nn.RMSNorm((T, d), eps=0.2) if hasattr(nn, "RMSNorm") else nn.Identity()
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(self.rms(torch.tanh(self.ln(x)))).mean(1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, (2, 3), padding="same", bias=False, dilation=(1, 2))
        self.c3 = nn.Conv2d(6, 4, 1, groups=2)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        return self.head(h.flatten(1))


class TinyLM(nn.Module):
    """Embedding (repeated tokens, padding row), LayerNorm, Linear, optionally tied head."""

    def __init__(self, vocab=11, d=6, tied=True, padding_idx=0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.pos = nn.Embedding(8, d)  # positions expanded to the batch (see forward)
        self.ln = nn.LayerNorm(d, eps=0.3)  # an eps far from the default: the kernel must use the module's
        self.mix = nn.Linear(d, d)
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
        h = h + torch.tanh(self.mix(self.ln(h)))
        return self.head(self.ln_f(h))


class Stacked(nn.Module):
    """Layers of equal shapes, which the engine contracts together (stacked); one layer called twice,
    and a bias-free one that stacks apart from the others (``bias=False``: with them, all weight-only)."""

    def __init__(self, d=5, k=3, bias=True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.a, self.b = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.c = nn.Linear(d, d, bias=False)
        self.rms1, self.rms2 = (
            (nn.RMSNorm(d, eps=0.2), nn.RMSNorm(d, eps=0.2))
            if hasattr(nn, "RMSNorm")
            else (nn.Identity(),) * 2
        )
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = x + torch.tanh(self.a(self.ln1(x)))
        h = h + torch.tanh(self.b(self.ln2(h)))
        h = h + torch.tanh(self.a(self.rms1(h)))
        h = self.rms2(self.c(h))
        return self.head(h).mean(1)


GPT2_WIDTH = 6


def _hf_gpt2(frozen: tuple[str, ...] = ()) -> nn.Module:
    """transformers' GPT-2 (projections of its Conv1D type), two blocks, tied head; ``frozen``: the
    parameters left untrained (a frozen bias: the weight-only paths, a frozen weight: the bias-only)."""
    pytest.importorskip("transformers")
    from adamshap_core.models.hf import HFCausalLM

    return _frozen(
        HFCausalLM("hf-gpt2", 11, 8, n_layer=2, n_head=2, d_model=GPT2_WIDTH, mlp_ratio=2), *frozen
    )


# the keys' third of each block's query-key-value bias
GPT2_KEY_BIASES = {
    f"lm.transformer.h.{i}.attn.c_attn.bias": slice(GPT2_WIDTH, 2 * GPT2_WIDTH) for i in range(2)
}


class LlamaNormed(nn.Module):
    """transformers' Llama RMSNorm, two (stacked) beside each other between a frozen Linear and a head,
    on a [B, T, d] sequence: only the head lies behind them, so their output-gradients are float64. (A whole
    Llama is tested in test_transformers.py: its norm computes in float32 also in a float64 model, so
    the gradients of the layers before it carry float32 rounding, and no float64 tolerance holds.)"""

    def __init__(self, d=5, k=3):
        super().__init__()
        pytest.importorskip("transformers")
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.mix = nn.Linear(d, d).requires_grad_(False)
        self.norm1, self.norm2 = LlamaRMSNorm(d, eps=0.3), LlamaRMSNorm(d, eps=0.3)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h = self.mix(x)
        return self.head(self.norm1(h) + self.norm2(torch.tanh(h))).mean(1)


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    data: Callable[[int, torch.Generator], tuple]  # (n, gen) -> (x, y)
    loss: Callable = cross_entropy
    # parts of parameters that do not change the model's function, {name: slice}: an attention key's
    # bias (softmax is shift-invariant), whose gradient is rounding alone; Adam with coupled L2 grows
    # such a parameter by about 1e5 a step (g = wd·p, far below eps), so any rounding steers it
    inert: dict[str, slice] = field(default_factory=dict)


def _tabular(d, k):
    return lambda n, g: (torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


def _sequence(d, T, k):
    return lambda n, g: (torch.randn(n, T, d, generator=g), torch.randint(0, k, (n,), generator=g))


def _images(n, g):
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _tokens(vocab=11, T=6):
    def make(n, g):
        idx = torch.randint(1, 4, (n, T), generator=g)  # few distinct tokens: many repeats
        idx[0, -2:] = 0  # padding at the end of the first example
        y = torch.randint(0, vocab, (n, T), generator=g)
        y[0, -2:] = -100
        idx[-1, 1] = 0  # the padding token where the loss is not masked: its row still gets no gradient
        return idx, y

    return make


def _frozen(model: nn.Module, *names: str) -> nn.Module:
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return model


# not in CASES: a batch of more than one image is refused (test_engine_kernels.py)
PER_IMAGE_CONV = Case("per-image-conv", PerImageConv, _images)


CASES = [
    Case("mlp-bias", lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), _tabular(5, 3)),
    Case(
        "mlp-nobias",
        lambda: nn.Sequential(nn.Linear(4, 9, bias=False), nn.Tanh(), nn.Linear(9, 2, bias=False)),
        _tabular(4, 2),
    ),
    Case(  # activations that overwrite the layers' outputs: b is the gradient of each layer's own output
        "mlp-in-place",
        lambda: nn.Sequential(
            nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3), nn.LeakyReLU(0.5, inplace=True)
        ),
        _tabular(5, 3),
    ),
    Case("linear-seq", lambda: SeqLinear(5, 3, 4, bias=True), _sequence(5, 4, 4)),
    Case("linear-seq-nobias", lambda: SeqLinear(3, 8, 2, bias=False), _sequence(3, 5, 2)),
    Case("conv2d", ConvNet, _images),
    Case("conv2d-valid-nobias", ValidConvNet, _images),
    Case("norms-2d", Norms2d, _sequence(5, 4, 3)),
    Case("lm-tied", lambda: TinyLM(tied=True), _tokens(), sequence_cross_entropy),
    Case("lm-untied", lambda: TinyLM(tied=False, padding_idx=None), _tokens(), sequence_cross_entropy),
    # transformers' layer types (skipped where transformers is not installed: `make test` installs it)
    Case("hf-gpt2", _hf_gpt2, _tokens(), sequence_cross_entropy, inert=GPT2_KEY_BIASES),
    Case(
        "hf-gpt2-frozen",
        lambda: _hf_gpt2(("lm.transformer.h.0.attn.c_attn.bias", "lm.transformer.h.1.mlp.c_fc.weight")),
        _tokens(),
        sequence_cross_entropy,
        inert=GPT2_KEY_BIASES,
    ),
    # in both blocks alike, so that the calls still stack: the qkv projections weight-only, the first MLP
    # projections bias-only
    Case(
        "hf-gpt2-frozen-in-every-block",
        lambda: _hf_gpt2(
            tuple(
                f"lm.transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn.bias", "mlp.c_fc.weight")
            )
        ),
        _tokens(),
        sequence_cross_entropy,
    ),
    Case("hf-llama-rmsnorm", LlamaNormed, _sequence(5, 4, 3)),
    Case("stacked", Stacked, _sequence(5, 4, 3)),
    # the stacks weight-only (Linear, LayerNorm), and bias-only (Linear, one module called twice)
    Case("stacked-nobias", lambda: Stacked(bias=False), _sequence(5, 4, 3)),
    Case(
        "stacked-frozen-linear-weights",
        lambda: _frozen(Stacked(), "a.weight", "b.weight"),
        _sequence(5, 4, 3),
    ),
    # only the biases of ln1, ln2 and a are valued there: the kernels' bias-only contractions
    Case(
        "stacked-frozen-weights",
        lambda: _frozen(Stacked(), "ln1.weight", "ln2.weight", "a.weight"),
        _sequence(5, 4, 3),
    ),
]
