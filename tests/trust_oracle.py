"""Shared oracle for the trust tests: one compiled step against one float64 torch.optim.SGD step."""
import copy

import torch
import torch.nn.functional as F

import lwcompile

ETA, GAMMA = 0.1, 0.5


def sgd_identity(model, x, y, frontend="auto", weight_decay=0.0):
    """(program, compiled loss, eager loss, params before, compiled params, SGD params), all float64."""
    model = model.double()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=ETA * GAMMA, weight_decay=weight_decay)
    loss = F.mse_loss(ref(x), y)
    loss.backward()
    opt.step()
    cfg = lwcompile.Config(steps=1, inner_optimizer="gd", inner_lr=ETA, outer_optimizer="sgd",
                           outer_lr=ETA * GAMMA, gamma=GAMMA, frontend=frontend)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = prog.step(x, y)
    return prog, got, loss.item(), before, dict(model.named_parameters()), dict(ref.named_parameters())


def assert_matches_sgd(model, x, y, frozen=(), frontend="auto"):
    prog, got, want, before, new, ref = sgd_identity(model, x, y, frontend)
    assert abs(got - want) < 1e-10
    for n in new:
        if n in frozen:
            assert torch.equal(new[n], before[n]), n
        else:
            assert torch.allclose(new[n], ref[n], rtol=0, atol=1e-10), n
    return prog
