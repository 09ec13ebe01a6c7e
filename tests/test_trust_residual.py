"""Issue 16 item 4: the target residual keeps the precision of γ·∂L/∂â (the offset form of the inner graphs).

The inner graphs used to recover γ·g as z − t from the stored target t = â − γg, losing eps·|â|: in eval-mode CNNs
with tiny gradients (a ConvNeXt-like layer scale of 1e-6, depthwise blocks behind BatchNorm) a float64 step matched
SGD only to ~1e-6 of a parameter's own update. They now take the offset d = γ·g itself. Oracles: one float64
``torch.optim.SGD`` step (METHOD.md's identity, T = 1 plain GD) at 1e-12 of each parameter's update, and for
``inner_optimizer="exact"`` an independent float64 least-squares solve (``torch.linalg.lstsq``) of each block's
ridge problem, built from autograd's ∂L/∂â.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwcompile
from lwcompile.config import PAIRS

D64 = torch.float64
ETA, GAMMA = 0.05, 0.5
TIGHT = 1e-12  # relative to each parameter's own update; before the offset form: 1e-7 .. 1e-5 on these models


class LayerScaleNet(nn.Module):
    """ConvNeXt/MobileNet-like: a large stem (|â| ~ 10), a depthwise → BatchNorm → pointwise branch scaled by a layer
    scale of 1e-6 into the residual stream, so the branch's gradients are ~1e-6 of its pre-activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw1 = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 8, 1)
        self.scale = nn.Parameter(torch.full((8, 1, 1), 1e-6))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x) * 10.0
        h = h + self.scale * self.pw2(F.gelu(self.pw1(self.bn(self.dw(h)))))
        return self.head(h.mean((2, 3)))


def _layer_scale_net() -> nn.Module:
    torch.manual_seed(0)
    m = LayerScaleNet().double()
    with torch.no_grad():  # eval-mode BatchNorm with running statistics of its own
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m.eval()


def _update_errors(before: dict, got: nn.Module, ref: nn.Module) -> dict[str, float]:
    """max |Δ_got − Δ_ref| / max |Δ_ref| per parameter (Δ: the step's change)."""
    out = {}
    for (n, p), r in zip(got.named_parameters(), ref.parameters()):
        du_ref, du = r.detach() - before[n], p.detach() - before[n]
        assert du_ref.abs().max() > 0, n  # every parameter moves: the check is not vacuous
        out[n] = float((du - du_ref).abs().max() / du_ref.abs().max())
    return out


@pytest.mark.parametrize("target", list(PAIRS))
def test_tiny_gradients_behind_a_layer_scale_match_sgd_to_float64_rounding(target):
    model = _layer_scale_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=D64), torch.randn(6, 4, generator=g, dtype=D64)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=ETA * GAMMA)
    F.mse_loss(ref(x), y).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = lwcompile.Config(target=target, local_loss=PAIRS[target], gamma=GAMMA, steps=1, inner_optimizer="gd",
                           inner_lr=ETA, outer_optimizer="sgd", outer_lr=ETA * GAMMA)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    assert {b.name for b in prog.blocks} >= {"dw", "pw1", "pw2"}  # the tiny-gradient convs are blocks
    prog.step(x, y)
    errs = _update_errors(before, model, ref)
    assert max(errs.values()) < TIGHT, errs


# ------------------------------------------------------------------------------------------ the exact solve
class ScaledMLP(nn.Module):
    """fc1's pre-activation is ~50 while its gradient is ~1e-6 (a layer scale); fc2 is an ordinary block."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.full((6,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a1 = self.fc1(x)  # kept for the oracle's ∂L/∂â
        h = 1.0 + self.scale * self.a1
        self.a2 = self.fc2(h)
        return self.a2


def _ridge_oracle(x: torch.Tensor, g: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW, Δb) minimizing ½‖X ΔWᵀ + 1 Δbᵀ + γG‖² + (λ/2)‖(ΔW, Δb)‖²: the stacked system [[X 1], [√λ I]] Δ =
    [[−γG], [0]] solved by least squares in float64 (independent of lwcompile's Cholesky of the normal equations)."""
    X1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=D64)], 1)
    k = X1.shape[1]
    A = torch.cat([X1, lam ** 0.5 * torch.eye(k, dtype=D64)])
    B = torch.cat([-GAMMA * g, torch.zeros(k, g.shape[1], dtype=D64)])
    delta = torch.linalg.lstsq(A, B, driver="gelsd").solution  # (k, out)
    return delta[:-1].t(), delta[-1]


def test_exact_solve_with_tiny_gradients_matches_a_float64_lstsq_oracle():
    torch.manual_seed(0)
    model = ScaledMLP().double()
    with torch.no_grad():
        model.fc1.weight.mul_(30.0)
        model.fc1.bias.fill_(50.0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 5, generator=g, dtype=D64), torch.randn(16, 3, generator=g, dtype=D64)
    lam = 0.5
    # the oracle's gradients ∂L/∂â from autograd on an eager copy
    ref = copy.deepcopy(model)
    out = ref(x)
    g1, g2 = torch.autograd.grad(F.mse_loss(out, y), [ref.a1, ref.a2])
    h = (1.0 + ref.scale * ref.a1).detach()
    want = {"fc1": _ridge_oracle(x, g1, lam), "fc2": _ridge_oracle(h, g2, lam)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=GAMMA, inner_optimizer="exact",
                           prox=lam, outer_optimizer="sgd", outer_lr=0.0)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    assert [b.name for b in prog.blocks] == ["fc1", "fc2"]
    prog.step(x, y)
    errs = {}
    for blk, (dW, db) in want.items():
        for name, d in ((f"{blk}.weight", dW), (f"{blk}.bias", db)):
            got = model.get_parameter(name).detach() - before[name]
            # the oracle's change as stored: W + ΔW rounds to W's ulp, which is ~1e-7 of this tiny update; an
            # update within float rounding of the oracle's rounds to the same float
            d = (before[name] + d) - before[name]
            assert d.abs().max() > 0, name
            errs[name] = float((got - d).abs().max() / d.abs().max())
    assert max(errs.values()) < TIGHT, errs


class ScaledConv(nn.Module):
    """A stride-1 conv whose pre-activation is ~50 while its gradient is ~1e-6 (a layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.full((3, 1, 1), 1e-6))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.a = self.conv(x)
        return self.head((1.0 + self.scale * self.a).mean((2, 3)))


def test_exact_solve_of_a_conv_with_tiny_gradients_matches_a_float64_lstsq_oracle():
    """The conv form of the exact solve (the unfolded input as the design matrix): the oracle unfolds with
    F.unfold and solves by least squares."""
    torch.manual_seed(0)
    model = ScaledConv().double()
    with torch.no_grad():
        model.conv.weight.mul_(10.0)
        model.conv.bias.fill_(50.0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 2, 5, 5, generator=g, dtype=D64), torch.randn(4, 2, generator=g, dtype=D64)
    lam = 0.5
    ref = copy.deepcopy(model)
    ga, = torch.autograd.grad(F.mse_loss(ref(x), y), [ref.a])
    X = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)  # (N·L, C·k·k), channel-major like W
    G = ga.reshape(4, 3, -1).transpose(1, 2).reshape(-1, 3)  # (N·L, out)
    dW, db = _ridge_oracle(X, G, lam)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", gamma=GAMMA, inner_optimizer="exact",
                           prox=lam, outer_optimizer="sgd", outer_lr=0.0)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    assert [b.name for b in prog.blocks] == ["conv", "head"]
    prog.step(x, y)
    errs = {}
    for name, d in (("conv.weight", dW.reshape(3, 2, 3, 3)), ("conv.bias", db)):
        p0 = before[name]
        d = (p0 + d) - p0  # as stored (see above)
        assert d.abs().max() > 0, name
        errs[name] = float(((model.get_parameter(name).detach() - p0) - d).abs().max() / d.abs().max())
    assert max(errs.values()) < TIGHT, errs


def test_the_target_form_is_still_what_inner_jobs_runs_on_targets_alone():
    """Callers holding targets only (no offsets) get the target-form graphs: the same update to the target's
    precision, and offset-form graphs are never fed a target by mistake."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 4, dtype=D64), torch.randn(8, 2, dtype=D64)
    prog = lwcompile.transform(m, F.mse_loss, (x,), lwcompile.Config(steps=2, inner_optimizer="gd", inner_lr=0.1))
    res = prog.compute_targets(x, y)
    by_t = prog.inner_jobs(res["inputs"], res["targets"])
    by_d = prog.inner_jobs(res["inputs"], res["targets"], offsets=res["offsets"])
    for name in by_t:
        (gt, at), (gd, ad) = by_t[name], by_d[name]
        assert gt is not gd
        assert "target" in prog.inner_signature(name, offset=False).input_names
        assert "offset" in prog.inner_signature(name).input_names
        for u, v in zip(gt(*at), gd(*ad)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
