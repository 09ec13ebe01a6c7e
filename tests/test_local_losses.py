"""Every closed form of METHOD.md against an independent oracle, in float64."""
import itertools
import math

import pytest
import torch

from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import residual, value
from lwcompile.passes.transfer import TRANSFERS

KW = {"leaky_relu": {"negative_slope": 0.1}, "elu": {"alpha": 0.7}, "softplus": {"beta": 1.5, "threshold": 20.0},
      "gelu": {"approximate": "none"}, "hardtanh": {"min_val": -1.5, "max_val": 0.8}, "celu": {"alpha": 0.7}}
LOSSES = ["squared_pre", "squared_post", "matching", "dual_bregman"]
# ReLU-like kinks make finite differences meaningless exactly at 0: sample away from it.
Z = torch.linspace(-3.1, 2.9, 12, dtype=torch.float64).reshape(3, 4)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("loss,transfer", list(itertools.product(LOSSES, TRANSFERS)))
def test_residual_is_the_gradient_of_the_local_loss(loss, transfer):
    kw = KW.get(transfer, {})
    target = torch.randn(3, 4) * 0.5
    z = Z.clone().requires_grad_(True)
    auto, = torch.autograd.grad(value(loss, transfer, kw, z, target), z)
    closed = residual(loss, transfer, kw, Z, target)
    torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)
    # central finite differences of the loss value
    h = 1e-6
    fd = torch.zeros_like(Z)
    for idx in itertools.product(range(3), range(4)):
        e = torch.zeros_like(Z)
        e[idx] = h
        fd[idx] = (value(loss, transfer, kw, Z + e, target) - value(loss, transfer, kw, Z - e, target)) / (2 * h)
    torch.testing.assert_close(closed, fd, rtol=1e-6, atol=1e-7)


def _integral(f, a, b, n=20001):
    t = torch.linspace(0.0, 1.0, n)
    pts = a + t[:, None] * (b - a)  # straight path a -> b
    vals = (f(pts) * (b - a)).sum(-1)
    return torch.trapezoid(vals, t)


@pytest.mark.parametrize("transfer", [t for t in TRANSFERS if t != "softmax"])
def test_matching_potential_F_is_the_integral_of_f(transfer):
    kw = KW.get(transfer, {})
    t = TRANSFERS[transfer]
    for a, b in [(-4.0, 3.0), (-0.5, 0.7), (1.0, 6.0), (-7.0, -2.0)]:
        grid = torch.linspace(a, b, 40001)
        numeric = torch.trapezoid(t.f(grid, kw), grid)
        exact = t.F(torch.tensor(b), kw) - t.F(torch.tensor(a), kw)
        assert float(exact) == pytest.approx(float(numeric), abs=1e-6, rel=1e-6), (a, b)


# where f has a kink (or bends sharply), so that a composite Simpson rule between them is exact to ~1e-12
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "elu": (0.0,), "selu": (0.0,), "celu": (0.0,), "relu6": (0.0, 6.0),
         "hardtanh": (-1.5, 0.8), "hardsigmoid": (-3.0, 3.0), "hardswish": (-3.0, 3.0), "softsign": (0.0,)}


def _simpson(f, a, b, kinks=(), n=4000):
    """∫ₐᵇ f by composite Simpson on each piece between the kinks inside (a, b) (signed when b < a)."""
    lo, hi = min(a, b), max(a, b)
    cuts = [lo] + sorted(k for k in kinks if lo < k < hi) + [hi]
    total = torch.tensor(0.0)
    for u, v in zip(cuts, cuts[1:]):
        x = torch.linspace(u, v, 2 * n + 1)
        y = f(x)
        total = total + (v - u) / (6 * n) * (y[0] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum() + y[-1])
    return total if b >= a else -total


@pytest.mark.parametrize("transfer", [t for t in TRANSFERS if t != "softmax"])
def test_F_of_z_minus_F_of_0_is_simpsons_integral_of_f_from_0(transfer):
    kw = KW.get(transfer, {})
    t = TRANSFERS[transfer]
    F0 = t.F(torch.tensor(0.0), kw)
    for z in (-8.0, -3.7, -1.2, -0.3, 0.4, 1.1, 2.6, 4.5, 9.0):
        numeric = _simpson(lambda x: t.f(x, kw), 0.0, z, KINKS.get(transfer, ()))
        exact = t.F(torch.tensor(z), kw) - F0
        assert float(exact) == pytest.approx(float(numeric), abs=1e-9, rel=1e-9), z


@pytest.mark.parametrize("transfer", list(TRANSFERS))
def test_vjp_is_autograd_of_f_including_at_the_kinks(transfer):
    kw = KW.get(transfer, {})
    t = TRANSFERS[transfer]
    # the corners themselves too: the closed f′ must take torch's branch there (the SGD identity compares updates)
    corners = [k + d for k in KINKS.get(transfer, ()) for d in (0.0, -1e-3, 1e-3)]
    z = torch.cat([Z.reshape(-1), torch.tensor(corners + [0.0, 7.0, -7.0, 25.0, -25.0])]).reshape(1, -1)
    v = torch.randn_like(z)
    zr = z.clone().requires_grad_(True)
    auto, = torch.autograd.grad(t.f(zr, kw), zr, v)
    torch.testing.assert_close(t.vjp(z, v, kw), auto, rtol=1e-12, atol=1e-14)


def test_softmax_potential_is_logsumexp_by_a_line_integral():
    t = TRANSFERS["softmax"]
    a, b = torch.randn(5), torch.randn(5) * 2
    numeric = _integral(lambda z: t.f(z, {}), a, b)
    assert float(t.F(b, {}) - t.F(a, {})) == pytest.approx(float(numeric), abs=1e-8)


def test_softplus_potential_matches_the_dilogarithm_series():
    # −Li₂(−eᶻ) by its defining power series Σ (−eᶻ)^k / k² (converges for eᶻ < 1)
    t = TRANSFERS["softplus"]
    for z in (-3.0, -1.0, -0.2):
        x = -math.exp(z)
        series = -sum(x ** k / k ** 2 for k in range(1, 4000))
        assert float(t.F(torch.tensor(z), {})) == pytest.approx(series, rel=1e-9)


def _conv_cases():
    yield "linear", (7, 5, 4), (3, 4), {}
    yield "matmul", (7, 4), (4, 3), {}
    for s, p, d, g in [(1, 0, 1, 1), (2, 1, 1, 1), (2, 2, 2, 2)]:
        a1 = {"stride": (s,), "padding": (p,), "dilation": (d,), "groups": g}
        yield "conv1d", (2, 4, 11), (6, 4 // g, 3), a1
        a2 = {k: v * 2 for k, v in a1.items() if k != "groups"} | {"groups": g}
        yield "conv2d", (2, 4, 7, 8), (6, 4 // g, 3, 2), a2
        a3 = {k: v * 3 for k, v in a1.items() if k != "groups"} | {"groups": g}
        yield "conv3d", (2, 4, 5, 6, 5), (2, 4 // g, 2, 2, 3), a3
        at = a2 | {"output_padding": (s - 1, 0)}
        yield "conv_transpose2d", (2, 4, 4, 5), (4, 6 // g, 3, 2), at


@pytest.mark.parametrize("op,x_shape,w_shape,attrs", list(_conv_cases()))
def test_weight_gradient_closed_forms_match_autograd_and_finite_differences(op, x_shape, w_shape, attrs):
    lin = LINEAR_OPS[op]
    x = torch.randn(x_shape)
    W = torch.randn(w_shape)
    z0 = lin.apply(x, W, None, attrs)
    b = torch.randn(z0.shape[1] if op.startswith("conv") else z0.shape[-1])
    r = torch.randn_like(z0)
    Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
    gW, gb = torch.autograd.grad((lin.apply(x, Wr, br, attrs) * r).sum(), (Wr, br))
    dW, db = lin.weight_grad(x, r, w_shape, attrs, True)
    torch.testing.assert_close(dW, gW, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db, gb, rtol=1e-10, atol=1e-10)
    # finite differences on a few weight entries (the objective is linear in W: exact up to rounding)
    flat = W.reshape(-1)
    for i in torch.randperm(flat.numel())[:5].tolist():
        e = torch.zeros_like(flat)
        e[i] = 1e-4
        fd = ((lin.apply(x, (flat + e).reshape(w_shape), b, attrs) - lin.apply(x, (flat - e).reshape(w_shape), b, attrs)) * r).sum() / 2e-4
        assert float(fd) == pytest.approx(float(dW.reshape(-1)[i]), rel=1e-7, abs=1e-8)
