"""The small GPT: every method through InRunShapley against brute force (float64), and the model itself."""

import copy

import pytest
import torch
from bruteforce import reference_values
from conftest import rel_err

from adamshap_core import InRunShapley
from adamshap_core.engine import GhostEngine
from adamshap_core.models import GPT, sequence_loss
from adamshap_core.tokenizer import IGNORE, PAD_ID

METHODS = ("adam", "adam_fixed", "sgd")
VOCAB, CONTEXT, T = 13, 8, 6


def tokens(n: int, gen: torch.Generator, pad_rows=(0, 2)):
    """Random sequences, with the tails of some rows padded (pad id in, IGNORE as target)."""
    x = torch.randint(1, VOCAB, (n, T), generator=gen)
    y = torch.randint(0, VOCAB, (n, T), generator=gen)
    for i, row in enumerate(r for r in pad_rows if r < n):
        cut = T - 1 - i  # different real lengths
        x[row, cut:], y[row, cut:] = PAD_ID, IGNORE
    return x, y


def small_gpt(tied: bool) -> GPT:
    return GPT(VOCAB, CONTEXT, n_layer=2, n_head=2, d_model=8, mlp_ratio=2, tie_weights=tied)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
@pytest.mark.parametrize("per_target", [True, False], ids=["per-target", "mean-target"])
@pytest.mark.parametrize(
    "fuse,clip", [(False, None), (True, 0.5)], ids=["separate", "fused-validation-rows-clipped"]
)
def test_gpt_values_match_brute_force(tied, per_target, fuse, clip, float64):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = small_gpt(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    vx, vy = tokens(4, gen, pad_rows=(1, 3))  # several validation targets, two of them padded
    tracker = InRunShapley(
        model,
        opt,
        sequence_loss,
        vx,
        vy,
        METHODS,
        per_target=per_target,
        max_grad_norm=clip,
        fuse_validation=fuse,
    )
    for _ in range(3):  # step 1 (no Adam state) and later steps
        x, y = tokens(5, gen)
        want = reference_values(
            model, opt, sequence_loss, x, y, vx, vy, per_target=per_target, max_grad_norm=clip
        )
        got = tracker.step(x, y)
        assert (tracker.fusion_blocked is None) == fuse
        if clip is not None:
            assert got.clip_factor < 1.0
        for m in METHODS:
            g = got.values[m] if per_target else got.values[m].unsqueeze(1)
            assert g.shape == (5, 4 if per_target else 1)
            # clipped: the brute-force secant's quotient loses digits where c·g is tiny at step 1
            # (both paths miss it alike; the next test compares them directly)
            assert rel_err(g, want[m]) <= (1e-9 if clip is None else 1e-6), m


@pytest.mark.parametrize("per_target", [True, False], ids=["per-target", "mean-target"])
def test_gpt_validation_rows_in_the_batch_give_the_separate_pass_values_and_updates(per_target, float64):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    models = [small_gpt(tied=True)]
    models.append(copy.deepcopy(models[0]))
    vx, vy = tokens(3, gen, pad_rows=(0,))
    trackers = [
        InRunShapley(
            m,
            torch.optim.Adam(m.parameters(), lr=1e-2),
            sequence_loss,
            vx,
            vy,
            METHODS,
            per_target=per_target,
            max_grad_norm=0.5,
            fuse_validation=fuse,
        )
        for m, fuse in zip(models, (False, True), strict=True)
    ]
    for _ in range(4):
        x, y = tokens(6, gen)
        separate, fused = (t.step(x, y) for t in trackers)
        assert trackers[1].fusion_blocked is None and fused.clip_factor < 1.0
        assert abs(fused.val_loss - separate.val_loss) <= 1e-12
        for m in METHODS:
            assert rel_err(fused.values[m], separate.values[m]) <= 1e-10, m
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_every_gpt_parameter_is_valued_and_the_tied_weight_once():
    model = small_gpt(tied=True)
    engine = GhostEngine(model)
    assert {id(p) for p in engine.parameters} == {id(p) for p in model.parameters()}
    assert sum(p is model.tok.weight for p in engine.parameters) == 1
    assert model.head.weight is model.tok.weight


def test_sequence_loss_ignores_padding(float64):
    torch.manual_seed(0)
    model = small_gpt(tied=True).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = tokens(1, gen, pad_rows=())
    n = 4  # real tokens
    padded_x = torch.cat([x[:, :n], torch.full((1, T - n), PAD_ID)], dim=1)
    padded_y = torch.cat([y[:, :n], torch.full((1, T - n), IGNORE)], dim=1)
    short = sequence_loss(model(x[:, :n]), y[:, :n])
    assert torch.allclose(sequence_loss(model(padded_x), padded_y), short, rtol=1e-12, atol=0)
    # and it is the mean over the real tokens
    per_token = torch.nn.functional.cross_entropy(model(x[:, :n])[0], y[0, :n], reduction="none")
    assert torch.allclose(short, per_token.mean().unsqueeze(0), rtol=1e-12, atol=0)


def test_attention_is_causal(float64):
    torch.manual_seed(0)
    model = small_gpt(tied=False).eval()
    x = torch.randint(1, VOCAB, (2, T))
    changed = x.clone()
    changed[:, -1] = (x[:, -1] % (VOCAB - 1)) + 1  # another last token
    a, b = model(x), model(changed)
    assert torch.equal(a[:, :-1], b[:, :-1])  # earlier positions never see a later token
    assert not torch.equal(a[:, -1], b[:, -1])


def test_sequences_longer_than_the_context_are_refused():
    model = small_gpt(tied=True)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))


def test_a_key_bias_whose_gradient_cancels_does_not_block_fused_rows():
    """Softmax ignores a shift common to all keys, so the key bias's gradient is float32 rounding
    noise, which the kernels and autograd round differently: the check must not read that as a part
    of the gradient the hooks missed (at the default width it did, and every step fell back)."""
    from adamshap_core.coverage import gradient_problem

    torch.manual_seed(0)
    model = GPT(50, 40, n_layer=2, n_head=4, d_model=64)
    gen = torch.Generator().manual_seed(0)
    # one validation sequence, as `make bench` runs the GPT
    x, y = torch.randint(1, 50, (1, 32), generator=gen), torch.randint(0, 50, (1, 32), generator=gen)
    assert (
        gradient_problem(GhostEngine(model), model, sequence_loss, x, y, per_row=False, training=True) is None
    )
