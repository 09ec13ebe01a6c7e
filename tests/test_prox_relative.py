"""Config(prox_relative=True): the exact solve's damping λ = prox · tr(XᵀX)/D per block and batch.

Oracles independent of the solver: torch.linalg.lstsq on the design matrix augmented with √λ I (λ computed here
from the raw inputs as prox · ‖X‖²_F / D), and the minimizer reached by L-BFGS through F.conv2d's autograd.
"""
import pytest
import torch
import torch.nn.functional as F

import lwcompile
from lwcompile.config import Config
from lwcompile.errors import ConfigError
from lwcompile.passes.exact_solver import make_exact_fn
from test_exact_solver import _conv_block, _lbfgs_minimizer, _linear_block

D64 = torch.float64


def _cfg(prox: float) -> Config:
    return Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=prox, prox_relative=True)


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("n", [6, 40])  # fewer rows than unknowns (the rows×rows solve) and more (the D×D one)
def test_linear_relative_prox_equals_augmented_lstsq(scale, n):
    g = torch.Generator().manual_seed(5)
    d_in, d_out, c = 9, 4, 0.3
    x = scale * torch.randn(n, d_in, generator=g, dtype=D64)
    a = torch.randn(n, d_out, generator=g, dtype=D64)
    W0, b0 = torch.randn(d_out, d_in, generator=g, dtype=D64), torch.randn(d_out, generator=g, dtype=D64)
    lam = c * float((x ** 2).sum()) / d_in  # mean diagonal of XᵀX, without the bias column
    design = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=D64)], 1), lam ** 0.5 * torch.eye(d_in + 1, dtype=D64)])
    rhs = torch.cat([a, lam ** 0.5 * torch.cat([W0.T, b0[None]], 0)])
    sol = torch.linalg.lstsq(design, rhs).solution
    W, b = make_exact_fn(_linear_block(d_in, d_out, n), _cfg(c))(W0, b0, x, a, torch.tensor(0.0))
    torch.testing.assert_close(W, sol[:d_in].T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, sol[d_in], rtol=1e-9, atol=1e-9)


def test_conv_relative_prox_equals_the_minimizer_through_conv_autograd():
    g = torch.Generator().manual_seed(6)
    attrs = dict(stride=1, padding=1, dilation=1, groups=1)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=D64)
    W0, b0 = 0.3 * torch.randn(3, 2, 3, 3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    z0 = F.conv2d(x, W0, b0, **attrs)
    a = z0 + torch.randn(z0.shape, generator=g, dtype=D64)
    c = 0.5
    # tr(XᵀX) of the unfolded input = Σ over output positions of the patch's squared entries: each input value
    # counted once per kernel tap that sees it, i.e. conv2d of x² with a ones kernel, summed.
    tr = float(F.conv2d(x ** 2, torch.ones(1, 2, 3, 3, dtype=D64), padding=1).sum())
    lam = c * tr / (2 * 3 * 3)
    blk = _conv_block(2, 2, 3, 3, 1, 1, 1, 1, tuple(x.shape), tuple(z0.shape))
    W, b = make_exact_fn(blk, _cfg(c))(W0, b0, x, a, torch.tensor(0.0))
    W_ref, b_ref = _lbfgs_minimizer(F.conv2d, W0, b0, x, a, lam, attrs)
    torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7)


def test_compiled_step_with_relative_prox_runs_and_iterative_optimizers_refuse_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    prog = lwcompile.transform(model, F.cross_entropy, (x,), _cfg(1.0).replace(gamma=50.0))
    before = float(F.cross_entropy(model(x), y))
    for _ in range(5):
        prog.step(x, y)
    assert float(F.cross_entropy(model(x), y)) < before
    with pytest.raises(ConfigError, match="prox_relative"):
        Config(prox=1.0, prox_relative=True)  # the default rmsprop_tf1 inner loop has no Gram matrix
    with pytest.raises(ConfigError, match="prox_relative"):
        _cfg(1.0).replace(prox_relative=1)
