"""Config(residual_norm="output"): the exact solve's residual rescaled per output to the block's RMS column norm.

Oracles independent of the solver: the residual normalized here by hand (column norms from the raw arrays), then
torch.linalg.lstsq on the design matrix augmented with √λ I (linear), and the minimizer reached by L-BFGS through
F.conv2d's autograd against the normalized target (conv); a whole training step against eager autograd.
"""
import pytest
import torch
import torch.nn.functional as F

import lwcompile
from lwcompile import dp_math
from lwcompile.config import Config
from lwcompile.errors import ConfigError
from lwcompile.passes.exact_solver import make_exact_fn
from test_exact_solver import _conv_block, _lbfgs_minimizer, _linear_block

D64 = torch.float64


def _cfg(prox: float = 0.3, relative: bool = False, norm: str = "output") -> Config:
    return Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=prox,
                  prox_relative=relative, residual_norm=norm)


def _by_hand(R: torch.Tensor, dims) -> torch.Tensor:
    """Each output's residual scaled to √(mean over outputs of ‖R_j‖²), written out independently."""
    norms = R.pow(2).sum(dims, keepdim=True).sqrt()
    target = (norms.pow(2).sum() / norms.numel()).sqrt()
    return R * target / norms


@pytest.mark.parametrize("n", [5, 40])  # fewer rows than unknowns (the rows×rows solve) and more (the D×D one)
def test_linear_output_norm_equals_lstsq_on_the_normalized_residual(n):
    g = torch.Generator().manual_seed(11)
    d_in, d_out, lam = 7, 4, 0.3
    x = torch.randn(n, d_in, generator=g, dtype=D64)
    W0, b0 = torch.randn(d_out, d_in, generator=g, dtype=D64), torch.randn(d_out, generator=g, dtype=D64)
    z0 = x @ W0.T + b0
    R = torch.randn(n, d_out, generator=g, dtype=D64) * torch.tensor([1e-3, 1.0, 10.0, 0.1], dtype=D64)
    Rn = _by_hand(R, 0)
    design = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=D64)], 1), lam ** 0.5 * torch.eye(d_in + 1, dtype=D64)])
    delta = torch.linalg.lstsq(design, torch.cat([Rn, torch.zeros(d_in + 1, d_out, dtype=D64)])).solution
    W, b = make_exact_fn(_linear_block(d_in, d_out, n), _cfg(lam))(W0, b0, x, z0 + R, torch.tensor(0.0))
    torch.testing.assert_close(W, W0 + delta[:d_in].T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, b0 + delta[d_in], rtol=1e-9, atol=1e-9)
    W_plain, _ = make_exact_fn(_linear_block(d_in, d_out, n), _cfg(lam, norm="none"))(W0, b0, x, z0 + R,
                                                                                    torch.tensor(0.0))
    assert (W - W_plain).abs().max() > 1e-2  # the option changes the step (so this test can fail)


def test_conv_output_norm_equals_the_minimizer_through_conv_autograd():
    g = torch.Generator().manual_seed(12)
    attrs = dict(stride=1, padding=1, dilation=1, groups=1)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=D64)
    W0, b0 = 0.3 * torch.randn(3, 2, 3, 3, generator=g, dtype=D64), torch.randn(3, generator=g, dtype=D64)
    z0 = F.conv2d(x, W0, b0, **attrs)
    R = torch.randn(z0.shape, generator=g, dtype=D64) * torch.tensor([0.01, 1.0, 5.0], dtype=D64)[None, :, None, None]
    lam = 0.5
    blk = _conv_block(2, 2, 3, 3, 1, 1, 1, 1, tuple(x.shape), tuple(z0.shape))
    W, b = make_exact_fn(blk, _cfg(lam))(W0, b0, x, z0 + R, torch.tensor(0.0))
    W_ref, b_ref = _lbfgs_minimizer(F.conv2d, W0, b0, x, z0 + _by_hand(R, (0, 2, 3)), lam, attrs)
    torch.testing.assert_close(W, W_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7)


def test_training_step_equals_eager_autograd_with_the_normalized_target():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(32, 5, dtype=D64), torch.randn(32, 3, dtype=D64) * torch.tensor([0.01, 1.0, 3.0], dtype=D64)
    gamma, c = 50.0, 1.0
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    z = (x @ W0.T + b0).requires_grad_(True)
    grad, = torch.autograd.grad(F.mse_loss(z, y), z)
    Rn = _by_hand(-gamma * grad, 0)
    lam = c * float((x ** 2).sum()) / 5
    design = torch.cat([torch.cat([x, torch.ones(32, 1, dtype=D64)], 1), lam ** 0.5 * torch.eye(6, dtype=D64)])
    delta = torch.linalg.lstsq(design, torch.cat([Rn, torch.zeros(6, 3, dtype=D64)])).solution
    prog = lwcompile.transform(model, F.mse_loss, (x,), _cfg(c, relative=True).replace(gamma=gamma))
    prog.step(x, y)
    torch.testing.assert_close(model.weight.detach(), W0 + delta[:5].T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model.bias.detach(), b0 + delta[5], rtol=1e-9, atol=1e-10)


def test_refusals():
    with pytest.raises(ConfigError, match="residual_norm"):
        Config(residual_norm="output")  # rmsprop_tf1 has no residual to rescale
    with pytest.raises(ConfigError, match="residual_norm"):
        _cfg(norm="column")
    assert Config().residual_norm == "none"
    blk = _linear_block(3, 2, 4)
    with pytest.raises(ConfigError, match="data-parallel"):  # shard sums cannot give the whole batch's norms
        dp_math.solve_stats(blk, _cfg(), (torch.zeros(2, 3), torch.zeros(2)), ())
