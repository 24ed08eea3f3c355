"""Brute-force references: per-example gradients materialised with torch.func.

Everything here is written from the definitions directly, independently of the
package's engine and preconditioner code, so that tests compare two
implementations rather than one with itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_example_grads(model: nn.Module, loss_fn, x, y, tied_apart: bool = False) -> dict[str, torch.Tensor]:
    """{param name: [B, *shape]} gradients of each example's own loss. ``tied_apart``: a parameter
    tied between modules (a head and a token embedding) gets a gradient under each of its names, the
    part of its use by that name's module; by default one, under its first name, summed over its uses."""
    named = model.named_parameters(remove_duplicate=not tied_apart)
    params = {n: p.detach() for n, p in named if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(ps, xi, yi):
        out = functional_call(model, (ps, buffers), (xi.unsqueeze(0),), tie_weights=not tied_apart)
        return loss_fn(out, yi.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def dot_products(grads: dict[str, torch.Tensor], matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, K]: Σ over the names of ⟨M_k, g_i⟩ / B, for gradients {name: [B, *shape]} and matrices
    {name: [K, *shape]} (the 1/B: the engine values the gradient of the batch's mean loss)."""
    B = next(iter(grads.values())).shape[0]
    return sum(grads[n].reshape(B, -1) @ m.reshape(m.shape[0], -1).T for n, m in matrices.items()) / B


def val_grads(model: nn.Module, loss_fn, vx, vy, per_target: bool) -> dict[str, torch.Tensor]:
    """{param name: [Q, *shape]} validation gradients (Q = 1: the mean loss)."""
    g = per_example_grads(model, loss_fn, vx, vy)
    return g if per_target else {n: t.mean(0, keepdim=True) for n, t in g.items()}


def adam_direction(g, m, v, beta1, beta2, eps, t):
    """u(g) exactly as torch.optim.Adam computes its step direction."""
    m_hat = (beta1 * m + (1 - beta1) * g) / (1 - beta1**t)
    v_hat = (beta2 * v + (1 - beta2) * g * g) / (1 - beta2**t)
    return m_hat / (v_hat.sqrt() + eps)


def adam_direction_derivative(g, m, v, beta1, beta2, eps, t):
    """du/dg written out: b/(S+ε) − (a+b·g)·(d·g/S)/(S+ε)², the second term 0 where S = 0."""
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    a, b = beta1 * m / bc1, (1 - beta1) / bc1
    c, d = beta2 * v / bc2, (1 - beta2) / bc2
    S = (c + d * g * g).sqrt()
    dS = torch.where(S > 0, d * g / torch.where(S > 0, S, 1.0), 0.0)
    return b / (S + eps) - (a + b * g) * dS / (S + eps) ** 2


def reference_values(
    model,
    optimizer,
    loss_fn,
    x,
    y,
    vx,
    vy,
    *,
    max_grad_norm=None,
    per_target=False,
    methods=("adam", "adam_fixed", "sgd"),
):
    """φ[method]: [B, Q] from per-example gradients and the optimizer's state *before* its step."""
    names = {id(p): n for n, p in model.named_parameters()}
    G = per_example_grads(model, loss_fn, x, y)
    V = val_grads(model, loss_fn, vx, vy, per_target)
    B = x.shape[0]
    batch = {n: g.mean(0) for n, g in G.items()}
    c = 1.0
    if max_grad_norm is not None:
        norm = torch.sqrt(sum((g * g).sum() for g in batch.values()))
        c = min(1.0, max_grad_norm / (float(norm) + 1e-6))
    out = {m: 0.0 for m in methods}
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            n = names[id(p)]
            if n not in G:  # frozen: no gradient, and the optimizer skips it
                continue
            gi, gv = G[n], V[n]  # [B, ...], [Q, ...]
            P = {"sgd": torch.ones_like(p)}
            if isinstance(optimizer, torch.optim.SGD):
                st = optimizer.state.get(p, {})
                mu, damp = group["momentum"], group["dampening"]
                gain = 1.0 if mu == 0 or st.get("momentum_buffer") is None else 1.0 - damp
                if mu and group["nesterov"]:
                    gain = 1.0 + mu * gain
                P["adam"] = P["adam_fixed"] = gain * torch.ones_like(p)
            else:
                st = optimizer.state.get(p, {})
                t = int(st["step"]) + 1 if "step" in st else 1
                m = st["exp_avg"] if "exp_avg" in st else torch.zeros_like(p)
                v = st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(p)
                b1, b2 = group["betas"]
                eps, wd = group["eps"], group["weight_decay"]
                decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
                    "decoupled_weight_decay", False
                )
                r = wd * p.detach() if not decoupled else torch.zeros_like(p)
                gN = c * batch[n] + r
                v_hat = (b2 * v + (1 - b2) * gN * gN) / (1 - b2**t)
                P["adam_fixed"] = ((1 - b1) / (1 - b1**t)) / (v_hat.sqrt() + eps)
                diff = gN - r
                quotient = (
                    adam_direction(gN, m, v, b1, b2, eps, t) - adam_direction(r, m, v, b1, b2, eps, t)
                ) / diff
                deriv = adam_direction_derivative(r, m, v, b1, b2, eps, t)
                P["adam"] = torch.where(diff.abs() > 1e-9, quotient, deriv)
            for meth in methods:
                cm = 1.0 if meth == "sgd" else c
                Mq = lr * P[meth] * gv  # [Q, ...]
                xi = cm * gi / B
                out[meth] = out[meth] + torch.einsum(
                    "bk,qk->bq", xi.reshape(B, -1), Mq.reshape(Mq.shape[0], -1)
                )
    return out
