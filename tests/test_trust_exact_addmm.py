"""Issue 16 item 2: ``Config(inner_optimizer="exact")`` solves addmm blocks (HF GPT-2's Conv1D) exactly.

addmm is linear in its weight: z = β·b + α·x W with W in (in, out) layout. The oracle is an independent float64
least-squares solve (``torch.linalg.lstsq``) of each block's ridge problem
    min over (ΔW, Δb) of ½‖α X ΔW + β 1 Δbᵀ + γ G‖² + (λ/2)(‖ΔW‖² + ‖Δb‖²),
with X the block's input rows and G = ∂L/∂â from autograd on an eager copy of the model. baddbmm with a parameter
weight has no exact solve: refused at transform, naming the block.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwcompile
from real_zoo import gpt2

D64 = torch.float64
GAMMA = 0.5


class AddmmNet(nn.Module):
    """Three addmm spellings: the function, α/β keywords with a (1, out) bias, and the tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(5, 6) * 0.5), nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 4) * 0.5), nn.Parameter(torch.randn(1, 4))
        self.w3, self.b3 = nn.Parameter(torch.randn(4, 3) * 0.5), nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a1 = torch.addmm(self.b1, x, self.w1)
        h1 = torch.tanh(self.a1)
        self.a2 = torch.addmm(self.b2, h1, self.w2, beta=0.5, alpha=2.0)
        h2 = torch.sigmoid(self.a2)
        self.a3 = self.b3.addmm(h2, self.w3)
        self.h = (x, h1, h2)  # each block's input, for the oracle
        return self.a3


def _oracle(x: torch.Tensor, g: torch.Tensor, lam: float, alpha: float, beta: float):
    rows = x.shape[0]
    A = torch.cat([alpha * x, beta * torch.ones(rows, 1, dtype=D64)], 1)
    B = -GAMMA * g
    if lam > 0:
        k = A.shape[1]
        A = torch.cat([A, lam ** 0.5 * torch.eye(k, dtype=D64)])
        B = torch.cat([B, torch.zeros(k, g.shape[1], dtype=D64)])
    delta = torch.linalg.lstsq(A, B, driver="gelsd").solution
    return delta[:-1], delta[-1]


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_exact_solve_of_addmm_blocks_matches_float64_lstsq(lam):
    torch.manual_seed(0)
    model = AddmmNet().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=D64), torch.randn(16, 3, generator=g, dtype=D64)
    ref = copy.deepcopy(model)
    grads = torch.autograd.grad(F.mse_loss(ref(x), y), [ref.a1, ref.a2, ref.a3])
    coef = [(1.0, 1.0), (2.0, 0.5), (1.0, 1.0)]
    want = {i + 1: _oracle(h.detach(), gr, lam, *coef[i]) for i, (h, gr) in enumerate(zip(ref.h, grads))}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=GAMMA, inner_optimizer="exact",
                           prox=lam, outer_optimizer="sgd", outer_lr=0.0)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    assert [(b.op, b.weight) for b in prog.blocks] == [("addmm", f"w{i}") for i in (1, 2, 3)]
    prog.step(x, y)
    for i, (dW, db) in want.items():
        for name, d in ((f"w{i}", dW), (f"b{i}", db)):
            p0 = before[name]
            d = (p0 + d.reshape(p0.shape)) - p0  # the oracle's change as stored (rounded like the parameter)
            got = model.get_parameter(name).detach() - p0
            assert d.abs().max() > 1e-5, name  # the block really moves
            err = float((got - d).abs().max() / d.abs().max())
            assert err < 1e-10, (name, err)


def test_gpt2_conv1d_projections_train_with_the_exact_solve():
    """The GPT-2 replica's Conv1D projections are addmm blocks the exact solve accepts; with λ → ∞ relative to
    the data (prox huge) the solve's change tends to −γ XᵀG / λ, the gradient step: compared on one block."""
    model, inputs, y, loss_fn = gpt2()
    model = model.double()
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=GAMMA, inner_optimizer="exact",
                           prox=1e6, outer_optimizer="sgd", outer_lr=0.0)
    ref = copy.deepcopy(model)
    prog = lwcompile.transform(model, loss_fn, inputs, cfg)
    addmm = [b for b in prog.blocks if b.op == "addmm"]
    assert len(addmm) == 8
    name = addmm[0].weight
    loss_fn(ref(*inputs), y).backward()
    w0 = ref.get_parameter(name).detach().clone()
    prog.step(inputs, y)
    got = model.get_parameter(name).detach() - w0
    want = -GAMMA * ref.get_parameter(name).grad / 1e6  # (XᵀX + λI)⁻¹ XᵀR → XᵀR / λ, XᵀR = −γ ∂L/∂W
    assert want.abs().max() > 0
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3


class _Bmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 4))
        self.b = nn.Parameter(torch.randn(2, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b, x, self.w).sum(0)


def test_baddbmm_blocks_are_refused_by_the_exact_solve_naming_the_block():
    x = torch.randn(2, 5, 3)
    with pytest.raises(lwcompile.ConfigError, match=r"block 'w'.*baddbmm.*iterative inner optimizer"):
        lwcompile.transform(_Bmm(), F.mse_loss, (x,), lwcompile.Config(
            target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0))
    prog = lwcompile.transform(_Bmm(), F.mse_loss, (x,), lwcompile.Config(inner_optimizer="gd"))
    assert [b.op for b in prog.blocks] == ["baddbmm"]  # still a block for the iterative optimizers


def test_addmm_with_a_per_row_bias_is_refused_by_the_exact_solve():
    class PerRow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(5, 2))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w)

    with pytest.raises(lwcompile.ConfigError, match=r"per\s+row"):
        lwcompile.transform(PerRow(), F.mse_loss, (torch.randn(5, 3),), lwcompile.Config(
            target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0))


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_the_data_parallel_split_of_the_exact_solve_handles_addmm(lam):
    """passes/exact_stats.py (what the data-parallel runtime all-reduces): sums over three shards of an addmm
    block's batch, solved, equal the one-process solve (checked above against lstsq), α and β included."""
    from lwcompile.passes import exact_stats

    torch.manual_seed(0)
    model = AddmmNet().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=D64), torch.randn(16, 3, generator=g, dtype=D64)
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=GAMMA, inner_optimizer="exact",
                           prox=lam, outer_optimizer="sgd", outer_lr=0.0)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    res = prog.compute_targets(x, y)
    jobs = prog.inner_jobs(res["inputs"], res["targets"], preacts=res["preacts"], offsets=res["offsets"])
    for blk in prog.blocks:
        params = tuple(model.get_parameter(p).detach() for p in blk.params)
        xi, ti = res["inputs"][blk.name], res["targets"][blk.name]
        parts = [exact_stats.gram_stats(blk, params, xi[s], ti[s]) for s in (slice(0, 5), slice(5, 11), slice(11, 16))]
        summed = tuple(sum(p[k] for p in parts) for k in range(5))
        got = exact_stats.solve_stats(blk, params, summed, lam)
        gm, args = jobs[blk.name]
        for name, u, v, p0 in zip(blk.params, got, gm(*args), params):
            assert (v - p0).abs().max() > 1e-6, name
            torch.testing.assert_close(u - p0, v - p0, rtol=1e-9, atol=1e-12, msg=name)
