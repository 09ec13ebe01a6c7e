"""Inner optimizers: torch-semantics ones step exactly like torch.optim; rmsprop_tf1 like METHOD.md's formula."""
import pytest
import torch

import lwcompile
from lwcompile.passes.inner import inner_lr_factor, make_inner_fn
from lwcompile.passes.optimizers import make_optimizer

TORCH = {
    "gd": (lambda p, lr: torch.optim.SGD(p, lr=lr), {}),
    "momentum": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.8), {"momentum": 0.8}),
    "rmsprop": (lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.95, eps=1e-6), {"decay": 0.95, "eps": 1e-6, "momentum": 0.0}),
    "rmsprop_momentum": (lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7, momentum=0.5),
                         {"decay": 0.9, "eps": 1e-7, "momentum": 0.5}),
    "adam": (lambda p, lr: torch.optim.Adam(p, lr=lr, betas=(0.8, 0.99), eps=1e-7), {"betas": (0.8, 0.99), "eps": 1e-7}),
}


@pytest.mark.parametrize("name", list(TORCH))
def test_pure_update_matches_torch_optim_over_several_steps(name):
    make_torch, opts = TORCH[name]
    opt = make_optimizer(name.split("_")[0], opts)
    w0 = torch.randn(3, 4, dtype=torch.float64)
    ref = w0.clone().requires_grad_(True)
    topt = make_torch([ref], 0.01)
    params, state = (w0,), opt.init((w0,))
    for _ in range(6):
        g = torch.randn(3, 4, dtype=torch.float64)
        ref.grad = g.clone()
        topt.step()
        params, state = opt.update((g,), state, params, 0.01)
    torch.testing.assert_close(params[0], ref.detach(), rtol=1e-12, atol=1e-12)


def test_rmsprop_tf1_follows_the_tensorflow1_formula():
    rho, mu, eps, lr = 0.9, 0.999, 1e-5, 1e-3
    opt = make_optimizer("rmsprop_tf1", {"decay": rho, "momentum": mu, "eps": eps})
    w = torch.randn(5, dtype=torch.float64)
    params, state = (w,), opt.init((w,))
    assert torch.equal(state[0], torch.ones(5, dtype=torch.float64))  # ms starts at one
    ms, mom, ref = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), w.clone()
    for _ in range(5):
        g = torch.randn(5, dtype=torch.float64)
        ms = rho * ms + (1 - rho) * g * g
        mom = mu * mom + lr * g / torch.sqrt(ms + eps)
        ref = ref - mom
        params, state = opt.update((g,), state, params, lr)
    torch.testing.assert_close(params[0], ref, rtol=1e-13, atol=1e-13)


def test_inner_step_decay_schedule():
    assert [inner_lr_factor(k, 10, True) for k in range(10)] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.30000000000000004, 0.25, 0.25]
    assert inner_lr_factor(7, 10, False) == 1.0


def test_inner_loop_runs_T_steps_of_gd_on_the_local_loss_with_prox():
    """Oracle: autograd of the local loss + proximal term, stepped by hand in float64."""
    blk = lwcompile.Block("fc", "fc", "linear", (), "tanh", (), "fc.weight", "fc.bias", (3, 4), (3,), (6, 4), (6, 3), 24)
    cfg = lwcompile.Config(target="md_post", local_loss="matching", steps=4, inner_optimizer="gd", prox=0.3,
                           inner_lr_decay=True)
    W, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64) * 1.6 - 0.8
    lr = 0.05
    newW, newb = make_inner_fn(blk, cfg)(W, b, x, y, torch.tensor(lr, dtype=torch.float64))
    from lwcompile.passes.local_losses import value
    w, bb = W.clone(), b.clone()
    for k in range(4):
        w_, b_ = w.clone().requires_grad_(), bb.clone().requires_grad_()
        loss = value("matching", "tanh", {}, x @ w_.T + b_, y) + 0.15 * (((w_ - W) ** 2).sum() + ((b_ - b) ** 2).sum())
        gw, gb = torch.autograd.grad(loss, (w_, b_))
        step = lr * max(1 - k / 4, 0.25)
        w, bb = w - step * gw, bb - step * gb
    torch.testing.assert_close(newW, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(newb, bb, rtol=1e-12, atol=1e-12)
